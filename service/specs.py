"""A submitted spec is data, never code: parsed with safe loaders, validated by the sweep spec's own
schema (known models, optimizers, schedules, datasets only), and every filesystem path in it must
resolve inside the allowed data roots."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


@dataclass
class FieldError:
    field: str
    reason: str
    type: str = "value_error"


class SpecError(ValueError):
    """An invalid spec; carries one entry per offending field (answers 422)."""

    def __init__(self, errors: list[FieldError], summary: str = "invalid sweep spec"):
        super().__init__(summary + ": " + "; ".join(f"{e.field}: {e.reason}" for e in errors))
        self.errors = errors
        self.summary = summary


@dataclass(frozen=True)
class CheckedSpec:
    spec: Any  # search_spaces.spec.SweepSpec
    data: dict
    canonical_json: str
    spec_hash: str
    total_trials: int | None = None


def parse_body(body: bytes, content_type: str | None) -> dict:
    """JSON by default, YAML when the content type says so; plain, bounded data only
    (:func:`search_spaces.loading.load_spec_text`: no aliases, depth and number limits)."""
    from search_spaces import loading

    media = (content_type or "application/json").split(";")[0].strip().lower()
    if not body.strip():
        raise SpecError([FieldError("body", "the request body is empty; send a sweep spec", "missing")])
    if media in YAML_TYPES:
        fmt = "yaml"
    elif media in ("application/json", "text/json") or media.endswith("+json"):
        fmt = "json"
    else:
        raise SpecError([FieldError("content-type", f"unsupported media type {media!r}; send "
                                    "application/json or application/yaml", "media_type")])
    try:
        data = loading.load_spec_text(body, fmt)
    except loading.SpecError as exc:
        raise SpecError([_body_error(e["field"], e["message"]) for e in exc.errors],
                        f"the body is not an acceptable {fmt.upper()} spec") from None
    if not isinstance(data, dict):
        raise SpecError([FieldError("body", f"a sweep spec is a mapping, got {type(data).__name__}", "type_error")])
    return data


def _body_error(where: str, message: str) -> FieldError:
    """A loader error as a FieldError: spec paths stay fields, places in the text belong to ``body``."""
    if where.startswith("<document>"):
        place = where.removeprefix("<document>").strip()
        return FieldError("body", f"{place}: {message}" if place else message, "parse_error")
    return FieldError(where, message, "parse_error")


def field_errors(exc) -> list[FieldError]:
    """pydantic ValidationError -> one FieldError per error, with a dotted field path."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "spec"
        out.append(FieldError(loc, err.get("msg", "invalid"), err.get("type", "value_error")))
    return out


def check_spec(data: dict, roots: list[Path], max_trials: int | None = None) -> CheckedSpec:
    """Validate a spec mapping; raise SpecError naming every bad field. ``max_trials`` is the server's cap on
    the trials of one sweep (every search algorithm)."""
    from pydantic import ValidationError

    from search_spaces import spec as sweep_spec

    _raise_path_errors(data, roots)  # before parsing, so nothing outside the roots is even looked at
    try:
        spec = sweep_spec.load_spec(data)
    except sweep_spec.SpecError as exc:
        raise SpecError([FieldError(e["field"], e["message"]) for e in exc.errors]) from exc
    except ValidationError as exc:
        raise SpecError(field_errors(exc)) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise SpecError([FieldError("spec", str(exc))]) from exc
    total = sweep_spec.count_trials(spec)
    if max_trials is not None and total is not None and total > max_trials:
        field = "num_samples" if spec.search.algorithm == "tpe" or not spec.grid_params() else "space"
        raise SpecError([FieldError(field, f"this sweep would run {total} trials; this server runs at most "
                                    f"{max_trials} per sweep (CONVTUNE_MAX_TRIALS): lower num_samples or shrink "
                                    "the grid", "too_many_trials")])
    dumped = spec.model_dump(mode="json")
    _raise_path_errors(dumped, roots)
    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return CheckedSpec(spec, dumped, canonical, hashlib.sha256(canonical.encode()).hexdigest(), total)


def _raise_path_errors(data: dict, roots: list[Path]) -> None:
    from search_spaces.paths import path_errors

    errors = [FieldError(e["field"], e["message"], "path_not_allowed") for e in path_errors(data, roots)]
    if errors:
        raise SpecError(errors)


def check_fits(checked: CheckedSpec, resources: tuple[dict, list] | None) -> None:
    """422 now rather than a job that waits forever: one trial must fit the live cluster."""
    if resources is None:
        return
    from search_spaces import spec as sweep_spec

    try:
        sweep_spec.check_resources(checked.spec, sweep_spec.cluster_capacity(*resources))
    except sweep_spec.SpecError as exc:
        raise SpecError([FieldError(e["field"], e["message"], "resources") for e in exc.errors],
                        "the cluster cannot run this sweep") from exc
