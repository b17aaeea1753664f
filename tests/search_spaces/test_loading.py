"""The one loader for spec text (files and request bodies): JSON by a JSON parser, YAML without aliases,
bounded depth and numbers, finite values, exponent floats."""

from __future__ import annotations

import pytest

from search_spaces.loading import MAX_DEPTH, SpecError, load_spec_text
from search_spaces.spec import load_spec


def refused(text, fmt) -> str:
    with pytest.raises(SpecError) as exc:
        load_spec_text(text, fmt)
    return " ".join(f"{e['field']}: {e['message']}" for e in exc.value.errors)


@pytest.mark.parametrize("fmt, text", [("json", "[" * 50_000 + "]" * 50_000), ("yaml", "- " * 50_000 + "x"),
                                       ("json", "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))])
def test_deep_nesting_is_refused_without_recursion_errors(fmt, text):
    assert "nested deeper" in refused(text, fmt)


@pytest.mark.parametrize("fmt, text", [("json", '{"n": ' + "9" * 5000 + "}"), ("yaml", "n: " + "9" * 5000),
                                       ("yaml", "n: 1000000000000000000000000000000")])
def test_huge_integers_are_refused(fmt, text):
    assert "digits" in refused(text, fmt)
    assert refused(text, fmt).startswith("n: ")  # named by the field, not by a place in the text


def test_json_numbers_are_refused_at_their_field():
    assert refused('{"space": {"blr": {"high": Infinity}}}', "json").startswith("space.blr.high: ")
    assert refused('{"a": [1, NaN]}', "json").startswith("a[1]: ")
    assert refused('{"a": {"b": ' + "1" * 40 + "}}", "json") == "a.b: an integer of 40 digits; numbers must have " \
        "at most 18 digits"


@pytest.mark.parametrize("fmt, text", [("yaml", "high: .inf"), ("yaml", "x: .nan"), ("json", '{"a": Infinity}'),
                                       ("json", '{"a": NaN}'), ("yaml", "x: 1e400"), ("json", '{"a": 1e300}')])
def test_non_finite_and_out_of_range_numbers_are_refused(fmt, text):
    assert "finite" in refused(text, fmt) or "out of range" in refused(text, fmt)


def test_aliases_are_refused_before_they_expand():
    assert "aliases" in refused("base: &a {x: *a}", "yaml")
    bomb = "a: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    assert "aliases" in refused(bomb, "yaml")
    assert load_spec_text("a: &x 1\nb: 2", "yaml") == {"a": 1, "b": 2}  # an anchor alone is harmless


def test_exponent_floats_are_floats_in_yaml_and_json_is_read_as_json(tmp_path):
    assert load_spec_text("lr: 1e-3\nb: 9e-1\nc: 1.5E+2\nd: 1_000\ne: '1e-3'", "yaml") == {
        "lr": 0.001, "b": 0.9, "c": 150.0, "d": 1000, "e": "1e-3"}
    assert load_spec_text('{"values": [9e-1, 0.8]}', "json") == {"values": [0.9, 0.8]}
    path = tmp_path / "spec.json"
    path.write_text('{"name": "j", "base": {"model": "convnextv2_atto"}, '
                    '"space": {"layer_decay": {"type": "choice", "values": [9e-1, 0.8]}, '
                    '"blr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}')
    spec = load_spec(path)  # YAML 1.1 read 1e-4 as the string '1e-4' and 9e-1 as a string value
    assert spec.space["blr"].low == 1e-4 and spec.space["layer_decay"].values == [0.9, 0.8]
    assert "not valid JSON" in refused("{a: 1}", "json")  # a .json file is JSON, not YAML


def test_dates_and_non_string_keys_are_not_plain_data():
    assert "not plain data" in refused("d: 2024-01-01", "yaml")
    assert "keys must be strings" in refused("1: x", "yaml")
