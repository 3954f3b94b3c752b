"""Each flow-map method's loss on its own: F2D2's and FALCON's loss configs hold only their own
options (read from the same ``[loss]`` TOML section), and a weight of zero removes its term."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from boltzflow import distributed
from boltzflow.distill.f2d2 import (
    F2D2,
    F2D2LossConfig,
    f2d2_diagonal_loss,
    f2d2_loss,
    f2d2_pair_loss,
    f2d2_semigroup_loss,
)
from boltzflow.distill.falcon import (
    FALCON,
    FALCONLossConfig,
    falcon_diagonal_loss,
    falcon_inverse_loss,
    falcon_loss,
    falcon_meanflow_loss,
    falcon_pair_loss,
)
from boltzflow.distill.flowmap_loss import FlowMapLossConfig, LossContext
from boltzflow.distill.train_students import LOSSES, StudentConfig
from boltzflow.flows.priors import StandardGaussian
from boltzflow.train.config import dataclass_from_dict

OPTS = {"hidden": 16, "layers": 1}
F2D2_ONLY = {"semigroup", "div_weight"}
FALCON_ONLY = {
    "meanflow",
    "inverse",
    "logdet",
    "energy",
    "energy_steps",
    "likelihood",
    "likelihood_steps",
    "meanflow_adaptive_power",
}


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _batch(b: int = 32, dim: int = 2) -> dict[str, Tensor]:
    """A teacher-shaped batch of random values (keys of :mod:`flowmap_loss`)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.rand(b, generator=g), torch.rand(b, generator=g)
    return {
        "x_s": torch.randn(b, dim, generator=g),
        "x_t": torch.randn(b, dim, generator=g),
        "s": s,
        "t": t,
        "dlogp": torch.randn(b, generator=g),
        "v_s": torch.randn(b, dim, generator=g),
        "x_k": torch.randn(b, dim, generator=g),
        "t_k": torch.rand(b, generator=g),
        "v_k": torch.randn(b, dim, generator=g),
        "div_k": torch.randn(b, generator=g),
        "m": torch.rand(b, generator=g),
        "t_any": torch.rand(b, generator=g),
    }


def _context() -> LossContext:
    return LossContext()


def test_each_loss_config_holds_only_its_methods_options() -> None:
    shared = _names(FlowMapLossConfig)
    assert _names(F2D2LossConfig) == shared | F2D2_ONLY
    assert _names(FALCONLossConfig) == shared | FALCON_ONLY
    assert not (shared & (F2D2_ONLY | FALCON_ONLY))
    assert {name: m.config for name, m in LOSSES.items()} == {
        "f2d2": F2D2LossConfig,
        "falcon": FALCONLossConfig,
    }


def test_the_loss_section_is_read_into_the_methods_config() -> None:
    """The ``[loss]`` table of a config file becomes the method's config; another method's key
    is refused with the valid keys listed, and a config object of the wrong method too."""
    cfg = dataclass_from_dict(
        StudentConfig, {"method": "falcon", "loss": {"meanflow": 0.5}}, where="run.toml"
    )
    assert cfg.loss == FALCONLossConfig(meanflow=0.5)
    assert dataclass_from_dict(StudentConfig, {"method": "f2d2"}).loss == F2D2LossConfig()
    assert StudentConfig(method="falcon").loss == FALCONLossConfig()
    assert StudentConfig(loss={"div_weight": 2.0}).loss == F2D2LossConfig(div_weight=2.0)
    with pytest.raises(ValueError, match=r"run\.toml: loss: unknown key 'meanflow'.*semigroup"):
        dataclass_from_dict(
            StudentConfig, {"method": "f2d2", "loss": {"meanflow": 0.5}}, where="run.toml"
        )
    with pytest.raises(TypeError, match="takes a FALCONLossConfig"):
        StudentConfig(method="falcon", loss=F2D2LossConfig())
    with pytest.raises(ValueError, match="F2D2 needs the teacher"):
        F2D2LossConfig(target="data")
    with pytest.raises(ValueError, match=r"loss\.div_weight must be >= 0"):
        F2D2LossConfig(div_weight=-1.0)
    with pytest.raises(ValueError, match=r"loss\.meanflow must be >= 0"):
        FALCONLossConfig(meanflow=-1.0)
    assert FALCONLossConfig(likelihood=1.0).uses_data and not F2D2LossConfig().uses_data
    assert FALCONLossConfig(energy=1.0).uses_energy and not F2D2LossConfig().uses_energy


def test_f2d2_loss_is_the_weighted_sum_and_zero_weights_remove_terms() -> None:
    torch.manual_seed(0)
    model = F2D2.build("mlp", prior=StandardGaussian(2), backbone_options=OPTS)
    bt = _batch()
    mid = bt["s"] + bt["m"] * (bt["t"] - bt["s"])
    w = 0.5
    diag, _ = f2d2_diagonal_loss(model, bt["x_k"], bt["t_k"], bt["v_k"], bt["div_k"], div_weight=w)
    pair, _ = f2d2_pair_loss(
        model, bt["x_s"], bt["s"], bt["x_t"], bt["t"], bt["dlogp"], div_weight=w
    )
    semi, _ = f2d2_semigroup_loss(model, bt["x_s"], bt["s"], bt["t"], mid, div_weight=w)

    cfg = F2D2LossConfig(diagonal=2.0, pairs=3.0, semigroup=0.25, div_weight=w)
    ctx = _context()
    state = torch.get_rng_state()
    total, parts = f2d2_loss(model, bt, cfg, ctx)
    torch.testing.assert_close(total, 2.0 * diag + 3.0 * pair + 0.25 * semi)
    assert set(parts) == {"diag_u", "diag_div", "pair_u", "pair_div", "semi_u", "semi_div"}
    assert torch.equal(torch.get_rng_state(), state), "F2D2 draws nothing beyond the batch"

    total, parts = f2d2_loss(model, bt, dataclasses.replace(cfg, semigroup=0.0), ctx)
    torch.testing.assert_close(total, 2.0 * diag + 3.0 * pair)
    assert not any(k.startswith("semi") for k in parts)
    total, parts = f2d2_loss(model, bt, F2D2LossConfig(diagonal=0, pairs=0, semigroup=0), ctx)
    assert float(total) == 0.0 and parts == {}


def test_falcon_loss_is_the_weighted_sum_and_zero_weights_remove_terms() -> None:
    torch.manual_seed(0)
    model = FALCON.build("mlp", prior=StandardGaussian(2), backbone_options=OPTS)
    bt = _batch()
    terms = {
        "fm": falcon_diagonal_loss(model, bt["x_k"], bt["t_k"], bt["v_k"]),
        "pair": falcon_pair_loss(model, bt["x_s"], bt["s"], bt["x_t"], bt["t"]),
        "meanflow": falcon_meanflow_loss(
            model, bt["x_s"], bt["s"], bt["t_any"], bt["v_s"], adaptive_power=0.5
        ),
        "inverse": falcon_inverse_loss(model, bt["x_s"], bt["s"], bt["t"]),
    }
    cfg = FALCONLossConfig(
        diagonal=2.0, pairs=0.5, meanflow=3.0, inverse=0.25, meanflow_adaptive_power=0.5
    )
    total, parts = falcon_loss(model, bt, cfg, _context())
    expected = 2.0 * terms["fm"] + 0.5 * terms["pair"] + 3.0 * terms["meanflow"]
    torch.testing.assert_close(total, expected + 0.25 * terms["inverse"])
    assert set(parts) == set(terms)
    for name, val in terms.items():
        assert parts[name] == pytest.approx(float(val.detach()))

    total, parts = falcon_loss(model, bt, dataclasses.replace(cfg, inverse=0.0), _context())
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"fm", "pair", "meanflow"}
    zero = FALCONLossConfig(diagonal=0, pairs=0, meanflow=0, inverse=0)
    total, parts = falcon_loss(model, bt, zero, _context())
    assert float(total) == 0.0 and parts == {}


def test_falcon_loss_reads_its_draws_from_the_batch() -> None:
    """``energy`` needs the target's energy and the batch's prior samples ``z``, ``likelihood``
    the batch's points ``x_ml``; the loss draws nothing itself (the same batch, the same loss)."""
    model = FALCON.build("mlp", prior=StandardGaussian(2), backbone_options=OPTS)
    only = {"diagonal": 0, "pairs": 0, "meanflow": 0, "inverse": 0}
    with pytest.raises(ValueError, match=r"context\.energy"):
        falcon_loss(model, _batch(), FALCONLossConfig(energy=1.0, **only), _context())

    def energy(x: Tensor) -> Tensor:
        return 0.5 * x.pow(2).sum(-1)

    ctx = LossContext(energy=energy)
    with pytest.raises(ValueError, match=r"key 'z'"):
        falcon_loss(model, _batch(), FALCONLossConfig(energy=1.0, **only), ctx)
    with pytest.raises(ValueError, match=r"key 'x_ml'"):
        falcon_loss(model, _batch(), FALCONLossConfig(likelihood=1.0, **only), ctx)
    g = torch.Generator().manual_seed(2)
    bt = {**_batch(), "z": torch.randn(32, 2, generator=g), "x_ml": torch.randn(32, 2, generator=g)}
    cfg = FALCONLossConfig(energy=1.0, likelihood=1.0, likelihood_steps=1, **only)
    total, parts = falcon_loss(model, bt, cfg, ctx)
    assert set(parts) == {"energy", "nll", "nll_dropped"} and torch.isfinite(total)
    again, _ = falcon_loss(model, bt, cfg, ctx)
    assert torch.equal(total, again)
    # the mean over two halves of the rows is the loss of the whole batch
    halves = [{k: v[i * 16 : (i + 1) * 16] for k, v in bt.items()} for i in (0, 1)]
    mean = sum(falcon_loss(model, h, cfg, ctx)[0] for h in halves) / 2
    torch.testing.assert_close(mean, total, rtol=1e-5, atol=1e-6)


def test_kept_mean_over_shares_is_the_global_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows left out (non-finite) are counted over all shares: the mean of the shares' parts
    (DDP's gradient average) is the mean over the kept rows of the global batch, also when the
    shares keep different numbers of rows."""
    values = torch.arange(8.0)
    keep = torch.tensor([True, False, False, True, True, True, True, True])
    monkeypatch.setattr(distributed, "sum_over_ranks", lambda n: keep.sum())
    ctx = LossContext(shards=2)
    zero = torch.zeros(())
    parts = [ctx.kept_mean(values[i : i + 4], keep[i : i + 4], zero) for i in (0, 4)]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, values[keep].mean())
    assert LossContext().kept_mean(values, torch.zeros(8, dtype=torch.bool), zero) is zero
