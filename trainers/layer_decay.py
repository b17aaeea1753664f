"""Layer-id rules for layer-wise LR decay, chosen by model family from a registry.

A rule maps a parameter name to a layer id; the LR multiplier of a parameter is
``layer_decay ** (num_layers + 1 - layer_id)`` (ConvNeXt-V2 ``main_finetune.py``, STMixer
``make_optimizer``), so the head (id ``num_layers + 1``) keeps the full LR and the stem the least.

Rules (see ``docs/optim.md`` and the reference ``optim_semantics.md`` §2.2, §4.1):

* ``convnextv2`` on timm names, mode ``single`` (ConvNeXt-V2's default): every block its own id, the
  stem id 1, ``stages.s.downsample`` the id of block 0 of stage s, head and final norm ``L + 1``.
* ``convnextv2``, mode ``group`` (ConvNeXt-V2's 12-layer grouping written for depths 3,3,27,3): stem 0,
  stage 0 blocks 1, stage 1 (and its downsample) 2, stage 2 blocks ``3 + b // 3`` (its downsample 3),
  stage 3 (and its downsample) 12, the rest 13.
* ``vit`` (STMixer's rule) for timm ``vit_*``: tokens, position embedding and patch embedding 0,
  ``blocks.k`` ``k + 1``, the rest ``depth + 1``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
LAYER_DECAY_TYPES = ("single", "group")


def normalize_param_name(name: str) -> str:
    """Strip the prefixes DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) add, in any nesting."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    return name


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / ``torch.compile`` wrappers (used for attributes like ``no_weight_decay``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


@dataclass(frozen=True)
class LayerRule:
    """A layer-id rule bound to one model: ``layer_id(name)`` in ``0..num_layers + 1``."""

    family: str
    mode: str
    num_layers: int
    assign: Callable[[str], int]

    def layer_id(self, param_name: str) -> int:
        return self.assign(normalize_param_name(param_name))


def layer_scales(layer_decay: float, num_layers: int) -> list[float]:
    """``scale[id] = layer_decay ** (num_layers + 1 - id)`` for ids ``0..num_layers + 1``."""
    check_layer_decay(layer_decay)
    return [layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]


def check_layer_decay(layer_decay: float) -> None:
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(
            f"layer_decay must be in (0, 1] (1.0 disables layer-wise decay), got {layer_decay!r}; "
            "typical finetuning values are 0.6-0.9"
        )


# ---------------------------------------------------------------------------------------------------
# ConvNeXt(V2) on timm names
_STAGE_RE = re.compile(r"^stages\.(\d+)\.(downsample|blocks)(?:\.(\d+))?")


def _convnext_depths(model: nn.Module) -> list[int]:
    stages = getattr(unwrap_model(model), "stages", None)
    if stages is None:
        raise ValueError("expected a timm ConvNeXt model with a `stages` attribute")
    return [len(stage.blocks) for stage in stages]


def _convnext_single(model: nn.Module) -> tuple[int, Callable[[str], int]]:
    depths = _convnext_depths(model)
    total = sum(depths)
    before = [sum(depths[:s]) for s in range(len(depths))]

    def assign(name: str) -> int:
        if name.startswith("stem."):
            return 1
        match = _STAGE_RE.match(name)
        if match:
            stage, kind, block = int(match[1]), match[2], match[3]
            return before[stage] + 1 + (int(block) if kind == "blocks" else 0)
        return total + 1

    return total, assign


def _convnext_group(model: nn.Module) -> tuple[int, Callable[[str], int]]:
    depths = _convnext_depths(model)
    if len(depths) != 4:
        raise ValueError(f"layer_decay_type 'group' needs a 4-stage ConvNeXt, got {len(depths)} stages")
    if depths[2] > 27:
        raise ValueError(
            f"layer_decay_type 'group' supports stage-2 depth <= 27 (ConvNeXt-V2 base/large/huge), "
            f"got {depths[2]}; use layer_decay_type 'single'"
        )
    num_layers = 12

    def assign(name: str) -> int:
        if name.startswith("stem."):
            return 0
        match = _STAGE_RE.match(name)
        if not match:
            return num_layers + 1
        stage, kind, block = int(match[1]), match[2], match[3]
        if stage == 0:
            return 1
        if stage == 1:
            return 2
        if stage == 2:
            return 3 + (int(block) // 3 if kind == "blocks" else 0)
        return num_layers

    return num_layers, assign


# ---------------------------------------------------------------------------------------------------
# ViT (STMixer's get_num_layer_for_vit on timm names)
_VIT_EMBED_NAMES = {"cls_token", "mask_token", "pos_embed", "dist_token", "reg_token"}


def _vit(model: nn.Module) -> tuple[int, Callable[[str], int]]:
    blocks = getattr(unwrap_model(model), "blocks", None)
    if blocks is None:
        raise ValueError("expected a timm VisionTransformer with a `blocks` attribute")
    depth = len(blocks)

    def assign(name: str) -> int:
        if name.startswith("encoder."):
            name = name[len("encoder."):]
        if name in _VIT_EMBED_NAMES or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1

    return depth, assign


@dataclass(frozen=True)
class ModelFamily:
    name: str
    prefixes: tuple[str, ...]
    modes: dict[str, Callable[[nn.Module], tuple[int, Callable[[str], int]]]]


FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily("convnextv2", ("convnextv2_",), {"single": _convnext_single, "group": _convnext_group}),
        # timm's ConvNeXt V1 shares the V2 parameter layout, so the same rules apply.
        ModelFamily("convnext", ("convnext_",), {"single": _convnext_single, "group": _convnext_group}),
        ModelFamily("vit", ("vit_",), {"single": _vit}),
    )
}


def family_for_model(model_name: str) -> ModelFamily | None:
    for family in FAMILIES.values():
        if model_name.startswith(family.prefixes):
            return family
    return None


def model_name_of(model: nn.Module) -> str | None:
    """The timm architecture name a model was created with, if timm recorded it."""
    cfg = getattr(unwrap_model(model), "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def get_layer_rule(model: nn.Module, model_name: str | None = None, mode: str = "single") -> LayerRule:
    """The layer-id rule for ``model`` (family from ``model_name`` or timm's recorded architecture)."""
    if mode not in LAYER_DECAY_TYPES:
        raise ValueError(f"layer_decay_type must be one of {list(LAYER_DECAY_TYPES)}, got {mode!r}")
    name = model_name or model_name_of(model) or type(unwrap_model(model)).__name__
    family = family_for_model(name)
    if family is None:
        known = ", ".join(f"{f.name} ({'/'.join(p + '*' for p in f.prefixes)})" for f in FAMILIES.values())
        raise ValueError(
            f"no layer-decay rule for model {name!r}; families with a rule: {known}. "
            "Use layer_decay 1.0 to train this model without layer-wise decay."
        )
    if mode not in family.modes:
        raise ValueError(
            f"layer_decay_type {mode!r} is not defined for the {family.name} family; "
            f"available: {sorted(family.modes)}"
        )
    num_layers, assign = family.modes[mode](model)
    return LayerRule(family.name, mode, num_layers, assign)
