"""TOML helpers: file errors, profiles, deep merges without aliasing, unknown-key messages."""

from __future__ import annotations

import pytest

from boltzflow.io.tomlfile import apply_profile, check_keys, merge_tables, read_toml_file


def test_read_toml_file_names_missing_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"spec file not found: .*none.toml"):
        read_toml_file(tmp_path / "none.toml", "spec")
    bad = tmp_path / "bad.toml"
    bad.write_text("a = = 1\n")
    with pytest.raises(ValueError, match=r"bad.toml: invalid TOML"):
        read_toml_file(bad)
    good = tmp_path / "good.toml"
    good.write_text('a = 1\n[b]\nc = "x"\n')
    assert read_toml_file(good) == {"a": 1, "b": {"c": "x"}}


def test_profiles_merge_deeply_and_are_checked():
    data = {"a": {"x": 1, "y": [1]}, "profiles": {"p": {"a": {"x": 2}, "b": 3}}}
    out = apply_profile(dict(data), "p", "f.toml")
    assert out == {"a": {"x": 2, "y": [1]}, "b": 3}
    assert out["a"]["y"] is not data["a"]["y"]  # a copy, never an alias
    assert apply_profile(dict(data), None, "f.toml") == {"a": {"x": 1, "y": [1]}}
    with pytest.raises(ValueError, match=r"f.toml: no profile 'q'; defined: \['p'\]"):
        apply_profile(dict(data), "q", "f.toml")
    with pytest.raises(TypeError, match=r"f.toml: profiles: expected a table"):
        apply_profile({"profiles": [1]}, "p", "f.toml")
    assert merge_tables({"a": {"b": 1}}, {"a": 5}) == {"a": 5}


def test_check_keys_names_the_unknown_keys():
    check_keys({"a": 1}, "t", {"a", "b"})
    with pytest.raises(ValueError, match=r"t: unknown key 'c' \(and \['d'\]\); valid keys: \['a'"):
        check_keys({"a": 1, "c": 2, "d": 3}, "t", {"a", "b"})
    with pytest.raises(TypeError, match="t: expected a table, got 3"):
        check_keys(3, "t", {"a"})
