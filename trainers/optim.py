"""Optimizers by name, from timm's optimizer registry, over factory-built parameter groups.

Names follow ConvNeXt-V2 / timm: the optimizer is the last ``_``-separated token, and a
``lookahead_`` prefix wraps the result in timm's ``Lookahead``. The optimizer-level weight decay is
always 0: every group carries its own (see ``trainers.param_groups``). The LR given here is the base
LR; the schedule multiplies it by each group's ``lr_scale`` before every update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trainers.names import check_optimizer_name

__all__ = ["check_optimizer_name", "create_optimizer", "optimizer_names", "resolve_lr"]


def optimizer_names() -> list[str]:
    """Every name :func:`create_optimizer` accepts without a wrapper prefix (timm's registry)."""
    from timm.optim import list_optimizers

    return sorted(list_optimizers())


def resolve_lr(*, blr: float, batch_size: int, accum_steps: int = 1, world_size: int = 1,
               lr: float | None = None) -> float:
    """ConvNeXt-V2's rule: ``lr = blr * batch_size * accum_steps * world_size / 256`` unless ``lr`` is given."""
    if lr is not None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        return float(lr)
    for field, value in (("blr", blr), ("batch_size", batch_size), ("accum_steps", accum_steps),
                         ("world_size", world_size)):
        if value is None or value <= 0:
            raise ValueError(f"{field} must be > 0, got {value!r}")
    return blr * batch_size * accum_steps * world_size / 256


def create_optimizer(
    name: str,
    param_groups: Sequence[dict[str, Any]] | Any,
    *,
    lr: float,
    momentum: float = 0.9,
    betas: Sequence[float] | None = None,
    eps: float | None = None,
    **extra: Any,
) -> torch.optim.Optimizer:
    """An optimizer from timm's registry over ``param_groups`` (the groups keep their own weight decay).

    Bare parameters (``model.parameters()``) are refused: the optimizer-level weight decay is 0, so they
    would silently train without weight decay.

    ``betas``, ``eps`` and ``momentum`` are passed where the optimizer takes them (timm drops them
    where it does not); ``extra`` goes to the optimizer's constructor as is.
    """
    from timm.optim import create_optimizer_v2

    opt = check_optimizer_name(name)
    kwargs: dict[str, Any] = dict(extra)
    if betas is not None:
        if len(betas) != 2:
            raise ValueError(f"betas must have two values (beta1, beta2), got {list(betas)!r}")
        kwargs["betas"] = tuple(float(b) for b in betas)
    if eps is not None:
        kwargs["eps"] = float(eps)
    if isinstance(param_groups, torch.nn.Module):
        raise TypeError("create_optimizer takes parameter groups, not a model: pass "
                        "build_param_groups(model, weight_decay=..., layer_decay=...)")
    groups = list(param_groups)
    bare = [i for i, g in enumerate(groups) if not isinstance(g, dict)]
    if bare:  # timm would train them with the optimizer-level weight decay, which is 0 here
        raise TypeError(f"create_optimizer got {len(bare)} bare parameter(s) instead of parameter groups, which "
                        "would train without weight decay; pass build_param_groups(model, weight_decay=...) "
                        "(or dicts with 'params' and 'weight_decay')")
    missing = [g.get("name", i) for i, g in enumerate(groups) if "weight_decay" not in g]
    if missing:
        raise ValueError(f"param groups {missing} carry no weight_decay; build them with build_param_groups")
    return create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=0.0, momentum=momentum, **kwargs)
