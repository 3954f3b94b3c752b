"""``boltzflow reweight`` and ``boltzflow estimate`` end to end on a small Many-Well sample file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from boltzflow.cli import main
from boltzflow.io.samples import SampleWriter
from boltzflow.sampling.proposals import ManyWellProposal
from boltzflow.systems import load_system


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reweight")
    mw = load_system("many_well_32")
    prop = ManyWellProposal.from_system(mw)
    samples = tmp / "samples.h5"
    with SampleWriter(samples, dim=32, provenance={"proposal": "ManyWellProposal", "seed": 0}) as w:
        for k in range(2):  # two chunks
            x, lq = prop.sample(1500, seed=k)
            w.append(x, log_q=lq, nfe=np.full(1500, 1))
    ref = tmp / "reference.h5"  # exact samples with the proposal's log q: gives forward ESS
    x_ref = mw.sample_exact(2000, seed=9)
    with SampleWriter(ref, dim=32, provenance={"exact": True}) as w:
        w.append(x_ref, log_q=prop.log_prob(x_ref))
    np.save(tmp / "reference.npy", x_ref.numpy())
    return tmp, samples, ref, mw, prop


def test_reweight_cli_end_to_end(files, capsys):
    tmp, samples, ref, mw, prop = files
    out = tmp / "result"
    code = main(
        [
            "reweight",
            str(samples),
            "--system",
            "many_well_32",
            "-o",
            str(out),
            "--reference",
            str(ref),
            "--n-bootstrap",
            "50",
            "--clip",
            "0.001",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "ESS/N" in printed and "report.md" in printed
    report = json.loads((out / "report.json").read_text())
    w = report["results"]["weights"]
    assert w["N"] == 3000 and 0.05 < w["ESS/N"] <= 1
    assert w["clipped weights"] == 3 and w["clipped fraction"] == pytest.approx(0.001)
    lz = w["log Z (delta)"]
    assert abs(lz["value"] - mw.log_z) < 5 * lz["stderr"], f"{lz} vs {mw.log_z}"
    m = report["results"]["metrics vs reference"]
    assert 0 < m["forward ESS/N (over reference)"] <= 1
    nll = m["NLL of reference under the proposal (nats)"]
    x_ref = mw.sample_exact(2000, seed=9)
    lq_ref = prop.log_prob(x_ref)
    assert nll["value"] == pytest.approx(-float(lq_ref.mean()), rel=1e-12) and nll["n"] == 2000
    # NLL - entropy = KL(p || q) >= 0, with entropy log Z + <u>; paired estimate, 3 se slack
    kl_terms = (-mw.energy(x_ref) - mw.log_z - lq_ref).numpy()
    kl, se = kl_terms.mean(), kl_terms.std(ddof=1) / math.sqrt(2000)
    assert kl > -3 * se, f"KL(p||q) estimate {kl:.4f} ± {se:.4f} is negative"
    assert m["energy W2, reweighted (kT, with sqrt)"] >= 0
    for name in ("energy_histograms.png", "log_weights.png", "ess_vs_n.png"):
        assert (out / name).stat().st_size > 2000
    md = (out / "report.md").read_text()
    assert "![energy histograms](energy_histograms.png)" in md
    # a plain .npy reference works too (no forward ESS then)
    assert (
        main(
            [
                "reweight",
                str(samples),
                "--system",
                "many_well_32",
                "-o",
                str(tmp / "r2"),
                "--reference",
                str(tmp / "reference.npy"),
                "--n-bootstrap",
                "20",
            ]
        )
        == 0
    )
    r2 = json.loads((tmp / "r2" / "report.json").read_text())["results"]["metrics vs reference"]
    assert "forward ESS/N (over reference)" not in r2


def test_reweight_cli_errors_are_one_line(files, capsys):
    tmp, _, _, _, _ = files
    bad = tmp / "no_logq.h5"
    with SampleWriter(bad, dim=32, provenance={}) as w:
        w.append(np.zeros((3, 32)), u=np.zeros(3))
    assert main(["reweight", str(bad), "--system", "many_well_32", "-o", str(tmp / "x")]) == 2
    err = capsys.readouterr().err
    assert "no log_q column" in err and "Traceback" not in err
    assert main(["reweight", str(tmp / "missing.h5"), "--system", "many_well_32", "-o", "x"]) == 2
    assert "not found" in capsys.readouterr().err


def test_estimate_cli_from_toml(files, capsys):
    tmp, samples, _, _, prop = files
    barrier = prop.well.barrier
    spec = tmp / "spec.toml"
    spec.write_text(
        f"""
samples = "{samples.name}"
system = "many_well_32"
n_bootstrap = 100
seed = 1

[[observable]]
name = "x2 of well 1"
feature = "coordinate"
index = 1

[[free_energy]]
name = "well 1 right vs left"
a = [{{feature = "coordinate", index = 0, min = {barrier}}}]
b = "complement"
"""
    )
    assert main(["estimate", str(spec), "-o", str(tmp / "est")]) == 0
    res = json.loads(capsys.readouterr().out)
    m_left, m_right = prop.well.masses
    exact = -math.log(m_right / m_left)
    for method in ("delta", "bootstrap"):
        e = res["free energies (kT)"]["well 1 right vs left"][method]
        assert abs(e["value"] - exact) < 4 * e["stderr"], f"{method}: {e} vs {exact}"
        o = res["observables"]["x2 of well 1"][method]
        assert abs(o["value"]) < 4 * o["stderr"], f"{method}: E[x2] = {o} vs 0"
    assert (tmp / "est" / "estimate.md").is_file() and (tmp / "est" / "estimate.json").is_file()
    spec.write_text('samples = "s.h5"\nsystem = "many_well_32"\nbogus = 1\n')
    assert main(["estimate", str(spec)]) == 2
    assert "unknown spec keys ['bogus']" in capsys.readouterr().err
