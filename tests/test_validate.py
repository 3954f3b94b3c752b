"""The shared numeric checks: same words for library, workflow files and CLI."""

from __future__ import annotations

import argparse
import math

import pytest

from boltzflow import validate as v


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (v.positive_int, [1, 7], [0, -3, 2.5, 1.0, True, "3", None]),
        (v.nonnegative_int, [0, 4], [-1, 0.5, False]),
        (v.positive_float, [1e-12, 3, 2.5], [0, -1.0, math.nan, math.inf, True, "1"]),
        (v.nonnegative_float, [0, 0.0, 1.5], [-1e-9, math.nan, -math.inf]),
        (v.probability, [1, 0.5, 1e-9], [0, 1.0000001, -0.1, math.nan]),
        (v.unit_interval, [0, 0.999], [1, -0.1, math.nan]),
        (v.finite_float, [-3, 0.0, 2.5], [math.nan, math.inf, "x"]),
    ],
)
def test_checks_accept_and_refuse(check, good, bad):
    for value in good:
        assert check(value, "opt") == value
    for value in bad:
        with pytest.raises(ValueError, match=r"^opt must be "):
            check(value, "opt")


def test_message_names_option_and_value():
    with pytest.raises(ValueError, match=r"^train\.steps must be a positive integer, got 0$"):
        v.positive_int(0, "train.steps")


def test_argparse_type_gives_the_same_words_and_exit_2(capsys):
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--steps", type=v.arg(v.positive_int, "--steps"))
    parser.add_argument("--atol", type=v.arg(v.positive_float, "--atol"))
    assert parser.parse_args(["--steps", "5", "--atol", "1e-5"]).steps == 5
    for argv, words in [
        (["--steps", "0"], "--steps must be a positive integer, got 0"),
        (["--steps", "2.5"], "--steps must be an integer, got '2.5'"),
        (["--atol", "-1"], "--atol must be a positive number, got -1.0"),
        (["--atol", "nan"], "--atol must be a positive number, got nan"),
    ]:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 2
        assert words in capsys.readouterr().err
