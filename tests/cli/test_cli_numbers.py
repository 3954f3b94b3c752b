"""Numeric options are checked when parsed, with the words of :mod:`boltzflow.validate` (the
same as the workflow files), so nothing runs on a count of 0 or a negative tolerance (#21)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from boltzflow.cli import build_parser, main
from boltzflow.validate import (
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
    unit_interval,
)

TRAIN = ["train", "teacher", "--data", "x.npy", "--config", "c.toml", "-o", "run"]
TRAIN_NF = ["train", "nf", "--data", "x.h5", "--system", "aldp", "-o", "run"]
DISTILL = ["distill", "teacher", "--method", "f2d2", "-o", "run"]
SAMPLE = ["sample", "teacher", "-n", "10", "-o", "s.h5"]
NLL = ["nll", "teacher", "--data", "x.npy"]
GENERATE = ["data", "generate", "dw4", "-n", "10", "-o", "d.h5"]
REWEIGHT = ["reweight", "s.h5", "--system", "dw4", "-o", "out"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a regression that runs a command writes nothing here


# (command line, option, text, check the option uses)
REFUSED: list[tuple[list[str], str, str, Callable[[Any, str], Any]]] = [
    (TRAIN, "--steps", "0", positive_int),
    (TRAIN, "--steps", "-3", positive_int),
    (TRAIN, "--seed", "-1", nonnegative_int),
    (TRAIN, "--threads", "0", positive_int),
    (TRAIN_NF, "--steps", "0", positive_int),
    (TRAIN_NF, "--seed", "-1", nonnegative_int),
    (TRAIN_NF, "--threads", "0", positive_int),
    (DISTILL, "--train-steps", "0", positive_int),
    (DISTILL, "--seed", "-2", nonnegative_int),
    (SAMPLE, "--atol", "0", positive_float),
    (SAMPLE, "--atol", "-1", positive_float),
    (SAMPLE, "--rtol", "0", positive_float),
    (SAMPLE, "--atol", "nan", positive_float),
    (SAMPLE, "--steps", "0", positive_int),
    (SAMPLE, "--batch-size", "0", positive_int),
    (SAMPLE, "-n", "0", positive_int),
    (SAMPLE, "--seed", "-1", nonnegative_int),
    (NLL, "-n", "0", positive_int),
    (NLL, "--quadrature-points", "0", positive_int),
    (NLL, "--rtol", "-0.5", positive_float),
    (GENERATE, "--chains", "0", positive_int),
    (GENERATE, "--chains", "-4", positive_int),
    (GENERATE, "-n", "0", positive_int),
    (GENERATE, "--stride", "0", positive_int),
    (GENERATE, "--burn-in", "-1", nonnegative_int),
    (REWEIGHT, "--clip", "1", unit_interval),
    (REWEIGHT, "--n-bootstrap", "0", positive_int),
    (REWEIGHT, "--level", "0", probability),
    (REWEIGHT, "--n-resample", "0", positive_int),
]


def _words(check: Callable[[Any, str], Any], option: str, text: str) -> str:
    integer = check in (positive_int, nonnegative_int)
    try:
        check(int(text) if integer else float(text), option)
    except ValueError as err:
        return str(err)
    raise AssertionError(f"{check.__name__} accepts {text}")


@pytest.mark.parametrize(
    ("argv", "option", "text", "check"),
    REFUSED,
    ids=[f"{a[0]}{o}={t}" for a, o, t, _ in REFUSED],
)
def test_bad_numbers_exit_2_with_the_shared_words(
    argv: list[str], option: str, text: str, check: Callable[[Any, str], Any], capsys
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, option, text])  # refused while parsing: no file above is ever read
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {_words(check, option, text)}" in err, err
    assert "Traceback" not in err


def test_integers_refuse_fractions(capsys) -> None:
    with pytest.raises(SystemExit):
        main([*TRAIN, "--steps", "2.5"])
    assert "--steps must be an integer, got '2.5'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "option", "text", "value"),
    [
        (GENERATE, "--burn-in", "0", 0),  # no burn-in is legal
        (TRAIN, "--seed", "0", 0),
        (SAMPLE, "--atol", "1e-6", 1e-6),
        (REWEIGHT, "--clip", "0", 0.0),
        (REWEIGHT, "--level", "0.9", 0.9),
    ],
)
def test_good_numbers_parse(argv: list[str], option: str, text: str, value: Any) -> None:
    args = build_parser().parse_args([*argv, option, text])
    dest = option.lstrip("-").replace("-", "_")
    assert getattr(args, dest) == value
