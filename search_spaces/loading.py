"""Spec text -> plain data, safely: the one loader for spec files (CLI) and request bodies (service).

A spec is small, shallow data. What this loader refuses, and why (limits in docs/sweeps.md):

* **YAML aliases** (``*a``): they expand (a 458-byte body became a 5.8 MB spec) and can refer to
  themselves (``base: &a {x: *a}``). Anchors without aliases are harmless and allowed.
* **Nesting deeper than** :data:`MAX_DEPTH`: a spec needs about six levels; 50,000 levels would blow
  the parser's or a later walker's recursion.
* **Integers longer than** :data:`MAX_INT_DIGITS` **digits and numbers beyond** :data:`MAX_ABS_NUMBER`:
  Python refuses to parse 5,000-digit integers, SQLite stores 64 bits, numpy samplers overflow.
* **NaN and infinities** (``.inf``, ``Infinity``, ``NaN``): they serialise as ``null`` and fail later.

JSON is read by a JSON parser. YAML is read with PyYAML's safe loader, with one YAML 1.2 fix: floats
in exponent form without a dot (``1e-3``) load as floats, not strings.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

import yaml

MAX_DEPTH = 32
MAX_INT_DIGITS = 18
MAX_ABS_NUMBER = 1e15


class SpecError(ValueError):
    """A sweep spec is invalid; ``errors`` lists ``{"field": "a.b", "message": ...}`` for every problem."""

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        lines = "\n".join(f"  {e['field']}: {e['message']}" for e in errors)
        super().__init__(f"invalid sweep spec ({len(errors)} error{'s' * (len(errors) != 1)}):\n{lines}")


def _error(field: str, message: str) -> SpecError:
    return SpecError([{"field": field, "message": message}])


class _Loader(yaml.SafeLoader):
    """SafeLoader without aliases, with a depth limit and YAML 1.2 exponent floats."""

    # a private copy of the resolver table (add_implicit_resolver would append to SafeLoader's lists)
    yaml_implicit_resolvers = {ch: list(rs) for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _error(_where(mark), "YAML aliases (*name) are not accepted; write the value out in full")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _error(_where(self.peek_event().start_mark),
                             f"nested deeper than {MAX_DEPTH} levels; a sweep spec needs about 6")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        digits = node.value.lstrip("+-").replace("_", "")
        if len(digits) > MAX_INT_DIGITS + 2:  # +2: a 0x / 0o prefix
            return _LongInt(len(digits))
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _where(mark) -> str:
    return f"<document> line {mark.line + 1}, column {mark.column + 1}"


class _LongInt:
    """An integer too long to convert (Python's digit limit), kept as its length so that
    :func:`check_plain_data` can name the field it was given for."""

    def __init__(self, digits: int):
        self.digits = digits


def _json_int(text: str) -> int | _LongInt:
    digits = len(text.lstrip("-"))
    return _LongInt(digits) if digits > MAX_INT_DIGITS else int(text)


def _json_constant(name: str) -> float:
    return float(name)  # NaN / Infinity / -Infinity: refused by check_plain_data, which names the field


def load_spec_text(text: str | bytes, fmt: Literal["json", "yaml"]) -> Any:
    """Parse spec text as JSON or YAML; raise :class:`SpecError` naming the place and the fix."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _error("<document>", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        if fmt == "json":
            data = json.loads(text, parse_int=_json_int, parse_constant=_json_constant)
        else:
            data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except RecursionError:
        raise _error("<document>", f"nested deeper than {MAX_DEPTH} levels; a sweep spec needs about 6") from None
    except json.JSONDecodeError as exc:
        raise _error(f"<document> line {exc.lineno}, column {exc.colno}", f"not valid JSON: {exc.msg}") from None
    except yaml.YAMLError as exc:
        raise _error("<document>", f"not valid YAML: {exc}") from None
    except ValueError as exc:  # e.g. an integer past Python's digit limit inside a YAML constructor
        if isinstance(exc, SpecError):
            raise
        raise _error("<document>", str(exc)) from None
    check_plain_data(data)
    return data


def check_plain_data(data: Any) -> None:
    """Refuse values no spec needs (deep nesting, huge or non-finite numbers, non-string keys) anywhere in
    ``data``; iterative, so it is safe on any input."""
    errors: list[dict[str, str]] = []
    stack: list[tuple[str, Any, int]] = [("", data, 1)]
    while stack and len(errors) < 20:
        where, value, depth = stack.pop()
        field = where or "<document>"
        if depth > MAX_DEPTH:
            errors.append({"field": field, "message": f"nested deeper than {MAX_DEPTH} levels"})
        elif isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    errors.append({"field": f"{where}.{key}" if where else str(key),
                                   "message": f"keys must be strings, got {type(key).__name__}; quote it"})
                    continue
                stack.append((f"{where}.{key}" if where else key, item, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item, depth + 1) for i, item in enumerate(value))
        elif isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        elif isinstance(value, _LongInt):
            errors.append({"field": field, "message": f"an integer of {value.digits} digits; numbers must have at "
                           f"most {MAX_INT_DIGITS} digits"})
        elif isinstance(value, float) and not math.isfinite(value):
            errors.append({"field": field, "message": f"{value} is not accepted; numbers must be finite"})
        elif isinstance(value, (int, float)) and abs(value) > MAX_ABS_NUMBER:
            errors.append({"field": field, "message": f"{value:g} is out of range; numbers must lie within "
                           f"+-{MAX_ABS_NUMBER:g}"})
        elif not isinstance(value, (int, float)):
            errors.append({"field": field, "message": f"a {type(value).__name__} is not plain data; use a string"})
    if errors:
        raise SpecError(errors)
