"""The benchmark's log q errors (sampler and scoring directions) and its markdown table."""

from __future__ import annotations

import math

import torch

from boltzflow.workflow.benchmark import (
    benchmark_table,
    ess_seed_summary,
    logq_errors,
    reference_nll,
)


class _OffsetScorer:
    """Scores points as the reference plus a fixed per-point offset (known errors)."""

    def __init__(self, ref: torch.Tensor, offset: torch.Tensor) -> None:
        self.ref, self.offset = ref, offset

    def log_prob(self, x: torch.Tensor, steps: int | None, *, batch_size: int) -> torch.Tensor:
        assert steps == 4 and batch_size == 8 and x.shape == (5, 2)
        return self.ref + self.offset


def test_logq_errors_both_directions_and_non_finite_points_dropped():
    ref = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float64)
    x = torch.zeros(5, 2)
    log_q = ref + torch.tensor([0.1, -0.3, 0.2, float("nan"), -0.5])
    model = _OffsetScorer(ref, torch.tensor([0.0, 0.05, -0.01, 0.02, float("inf")]))
    out = logq_errors(model, 4, x, log_q.float(), ref, batch_size=8)
    # |errors| 0.1, 0.3, 0.2, 0.5 (NaN dropped): torch's median is the lower middle value
    assert math.isclose(out["logq_err_median"], 0.2, abs_tol=1e-6)
    assert math.isclose(out["logq_err_mean"], 0.275, abs_tol=1e-6)
    # scored: 0, 0.05, 0.01, 0.02 (inf dropped)
    assert math.isclose(out["logq_err_score_median"], 0.01, abs_tol=1e-6)


def test_reference_nll_leaves_out_and_counts_unscored_points():
    ref = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float64)
    model = _OffsetScorer(ref, torch.tensor([0.0, 0.0, float("nan"), 0.0, 0.0]))
    nll, unscored = reference_nll(model, torch.zeros(5, 2), 4, batch_size=8)
    assert unscored == 1 and math.isclose(nll, -(1.0 - 2.0 + 3.0 + 0.0) / 4)
    row = {
        "model": "falcon",
        "steps": 4,
        "log_q": "jac",
        "nfe_per_sample": 4,
        "samples_per_s": 1.0,
        "ess_fraction": 0.5,
        "energy_w2": 0.1,
        "nll": nll,
        "nll_unscored": unscored,
        "logq_err_median": 0.2,
        "logq_err_mean": 0.3,
    }
    assert "| -0.500 (1 n/a) |" in benchmark_table([row])


def test_table_shows_dash_where_a_row_lacks_the_scored_error():
    base = {
        "steps": 4,
        "log_q": "head",
        "nfe_per_sample": 4,
        "samples_per_s": 100.0,
        "ess_fraction": 0.5,
        "energy_w2": 0.1,
        "nll": 7.0,
        "logq_err_median": 0.2,
        "logq_err_mean": 0.3,
    }
    rows = [
        {"model": "teacher", **base, "logq_err_score_median": 0.0},
        {"model": "old", **base, "samples_per_s": 5000.0},
    ]
    lines = benchmark_table(rows).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 14
    assert "| 0.200 | 0.300 | 0.000 | - |" in lines[2]
    assert "| 50x |" in lines[3] and "| 0.200 | 0.300 | - | - |" in lines[3]


def test_ess_seed_summary_gives_ratios_to_the_teacher_seed_by_seed():
    rows = [
        {
            "model": "teacher",
            "steps": "dopri5",
            "ess_fraction_seeds": [0.8, 0.5],
            "ess_fraction_pooled": 0.6,
        },
        {"model": "f2d2", "steps": 1},
        {
            "model": "f2d2",
            "steps": 4,
            "ess_fraction_seeds": [0.4, 0.5],
            "ess_fraction_pooled": 0.3,
        },
    ]
    lines = ess_seed_summary(rows).splitlines()
    assert lines[0] == "- teacher K=dopri5: 0.800, 0.500 (mean 0.650; pooled 0.600)"
    # 0.4 / 0.8, 0.5 / 0.5; 0.45 / 0.65; 0.3 / 0.6
    assert lines[1] == (
        "- f2d2 K=4: 0.400, 0.500 (mean 0.450; pooled 0.300); / teacher, seed by seed: "
        "0.50, 1.00; of the means: 0.69; pooled: 0.50"
    )
    assert len(lines) == 2


def test_ess_seed_summary_without_teacher_seeds_has_no_ratios():
    rows = [
        {"model": "teacher", "steps": "dopri5"},
        {"model": "a", "steps": 4, "ess_fraction_seeds": [0.3]},
    ]
    assert ess_seed_summary(rows) == "- a K=4: 0.300 (mean 0.300)"
    assert ess_seed_summary([]) == ""


def test_molecular_columns_appear_only_when_rows_carry_them():
    from boltzflow.sampling.results import Estimate
    from boltzflow.workflow.benchmark import profile_label

    base = {
        "log_q": "head",
        "nfe_per_sample": 4,
        "samples_per_s": 100.0,
        "ess_fraction": 0.5,
        "energy_w2": 0.1,
        "nll": 7.0,
        "logq_err_median": 0.2,
        "logq_err_mean": 0.3,
    }
    est = Estimate(value=4.0, ci_low=3.5, ci_high=4.5, stderr=0.25, n=100, ess=80.0, method="delta")
    rows = [
        {
            "model": "teacher",
            "steps": "dopri5",
            **base,
            "torus_w2": 0.4321,
            "delta_f": {"delta": est},
            "delta_f_vs_reference": {
                "difference": 0.054,
                "stderr": 0.261,
                "z": 0.207,
                "consistent_at_2se": True,
            },
        },
        {
            "model": "euler",
            "steps": 4,
            **base,
            "torus_w2": None,
            "delta_f": {"undefined": "state A has zero weight"},
            "delta_f_vs_reference": {"difference": None, "note": "undefined"},
        },
    ]
    lines = benchmark_table(rows).splitlines()
    assert lines[0].endswith("| torus W2 rw (rad) | ΔF (kT) [CI] | ΔF − ref (kT) |")
    assert all(line.count("|") == 17 for line in lines)
    assert lines[2].endswith(
        "| 0.432 | 4.000 [3.500, 4.500] | +0.054 ± 0.261 (z = 0.21; within 2 se: yes) |"
    )
    assert lines[3].endswith("| - | undefined | undefined |")
    # DW4-style rows (no ΔF) keep the 13 columns
    plain = [{k: v for k, v in r.items() if not k.startswith(("torus", "delta"))} for r in rows]
    assert benchmark_table(plain).splitlines()[0].count("|") == 14
    # the F(φ) figure: the teacher, one-pass models and rows at the chosen steps
    assert profile_label(rows[0], 4) == "teacher"
    assert profile_label(rows[1], 4) == "euler K=4"
    assert profile_label({**rows[1], "steps": 2}, 4) is None
    assert profile_label({"model": "nf", "steps": "-"}, 4) == "nf"
