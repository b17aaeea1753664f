"""Optimizer parameter groups with layer-wise LR decay and weight-decay exclusions.

Semantics follow ConvNeXt-V2's ``get_parameter_groups`` (reference ``optim_semantics.md`` §1.3),
restated on timm parameter names:

* frozen parameters (``requires_grad=False``) are left out;
* no weight decay for 1-D tensors, names ending ``.bias`` / ``.gamma`` / ``.beta``, the model's
  ``no_weight_decay()`` set, and user glob patterns (fnmatch on the unwrapped name);
* with ``layer_decay < 1`` groups are keyed ``layer_{id}_{decay|no_decay}`` with
  ``lr_scale = layer_decay ** (N + 1 - id)``; with ``layer_decay == 1`` there are two groups,
  ``decay`` and ``no_decay``, both with ``lr_scale`` 1.0;
* groups appear in first-appearance order along ``named_parameters()``.

Every group carries ``name``, ``layer_id`` (None for the merged groups of ``layer_decay == 1``),
``lr_scale``, ``weight_decay``, ``wd_scale`` (1 for decayed groups, 0 otherwise; used by the
weight-decay schedule) and ``param_names`` (unwrapped names, aligned with ``params``).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch.nn as nn

from trainers.layer_decay import (
    LayerRule,
    check_layer_decay,
    get_layer_rule,
    layer_scales,
    normalize_param_name,
    unwrap_model,
)

NO_DECAY_SUFFIXES = (".bias", ".gamma", ".beta")

log = logging.getLogger(__name__)


def model_no_weight_decay(model: nn.Module) -> set[str]:
    """The names (or fnmatch patterns) the model itself exempts from weight decay."""
    inner = unwrap_model(model)
    fn = getattr(inner, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def is_no_decay(name: str, ndim: int, skip: Iterable[str]) -> bool:
    """ConvNeXt-V2's exclusion rule plus fnmatch patterns (``skip`` may hold plain names or globs)."""
    if ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES):
        return True
    return any(name == pattern or fnmatch.fnmatchcase(name, pattern) for pattern in skip)


def build_param_groups(
    model: nn.Module,
    *,
    model_name: str | None = None,
    layer_decay: float = 1.0,
    layer_decay_type: str = "single",
    weight_decay: float = 0.05,
    no_weight_decay: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Torch param-group dicts for ``model`` (see the module docstring for the rules)."""
    check_layer_decay(layer_decay)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    rule: LayerRule | None = None
    scales: list[float] | None = None
    if layer_decay != 1.0:
        rule = get_layer_rule(model, model_name, layer_decay_type)
        scales = layer_scales(layer_decay, rule.num_layers)
    skip = model_no_weight_decay(model) | set(no_weight_decay)

    groups: dict[str, dict[str, Any]] = {}
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = normalize_param_name(raw_name)
        decay = not is_no_decay(name, param.ndim, skip)
        kind = "decay" if decay else "no_decay"
        if rule is not None:
            layer_id = rule.layer_id(name)
            key, lr_scale = f"layer_{layer_id}_{kind}", scales[layer_id]
        else:
            layer_id, key, lr_scale = None, kind, 1.0
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "name": key,
                "layer_id": layer_id,
                "lr_scale": lr_scale,
                "weight_decay": weight_decay if decay else 0.0,
                "wd_scale": 1.0 if decay else 0.0,
                "params": [],
                "param_names": [],
            }
        group["params"].append(param)
        group["param_names"].append(name)
    if rule is not None:
        warn_layer_id_gaps(rule, layer_decay, {g["layer_id"] for g in groups.values()})
    return list(groups.values())


def layer_id_gaps(used_ids: Iterable[int]) -> list[tuple[int, int]]:
    """Consecutive used layer ids ``(a, b)`` with unused ids between them."""
    ids = sorted(set(used_ids))
    return [(a, b) for a, b in zip(ids, ids[1:], strict=False) if b - a > 1]


def warn_layer_id_gaps(rule: LayerRule, layer_decay: float, used_ids: Iterable[int]) -> None:
    """ConvNeXt-V2's ``group`` rule is written for stage-2 depth 27; shallower models leave ids unused, so
    the LR jumps by ``layer_decay ** -gap`` between neighbouring layers (tiny at 0.6: 36x into stage 3)."""
    gaps = layer_id_gaps(used_ids)
    if not gaps or layer_decay == 1.0 or rule.mode != "group":
        return
    jumps = ", ".join(f"ids {a + 1}..{b - 1} unused: {layer_decay ** (a - b):.0f}x from id {a} to id {b}"
                      for a, b in gaps)
    log.warning("layer_decay_type %r on this model leaves layer ids unused, so the LR jumps between neighbouring "
                "layers at layer_decay %g (%s); this matches ConvNeXt-V2's recipe, which was written for stage-2 "
                "depth 27 (base and larger). For a smooth decay use layer_decay_type 'single'.",
                rule.mode, layer_decay, jumps)


def param_records(
    model: nn.Module, groups: Sequence[dict[str, Any]], *, model_name: str | None = None,
    layer_decay_type: str = "single",
) -> list[dict[str, Any]]:
    """One record per trainable parameter: ``name``, ``layer_id``, ``lr_scale``, ``weight_decay``, ``group``.

    ``layer_id`` is the rule's id even when ``layer_decay == 1`` merged the layers (None for a model
    family without a rule).
    """
    try:
        rule = get_layer_rule(model, model_name, layer_decay_type)
    except ValueError:
        rule = None
    records = []
    for group in groups:
        for name, param in zip(group["param_names"], group["params"], strict=True):
            records.append({
                "name": name,
                "layer_id": group["layer_id"] if group["layer_id"] is not None else (
                    rule.layer_id(name) if rule else None),
                "lr_scale": group["lr_scale"],
                "weight_decay": group["weight_decay"],
                "group": group["name"],
                "shape": list(param.shape),
            })
    return records


def group_summaries(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON-friendly group rows: name, layer id, tensor and parameter counts, lr_scale, weight decay."""
    return [
        {
            "group": g["name"],
            "layer_id": g["layer_id"],
            "tensors": len(g["params"]),
            "parameters": sum(p.numel() for p in g["params"]),
            "lr_scale": g["lr_scale"],
            "weight_decay": g["weight_decay"],
        }
        for g in groups
    ]


def param_group_table(groups: Sequence[dict[str, Any]]) -> str:
    """A fixed-width, human-readable table of the groups (for logs and as an MLflow artifact)."""
    rows = group_summaries(groups)
    header = ("group", "layer", "tensors", "params", "lr_scale", "wd")
    body = [
        (
            r["group"],
            "-" if r["layer_id"] is None else str(r["layer_id"]),
            str(r["tensors"]),
            f"{r['parameters']:,}",
            f"{r['lr_scale']:.6g}",
            f"{r['weight_decay']:g}",
        )
        for r in rows
    ]
    total = ("total", "", str(sum(r["tensors"] for r in rows)), f"{sum(r['parameters'] for r in rows):,}", "", "")
    widths = [max(len(row[i]) for row in [header, *body, total]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total)]) + "\n"
