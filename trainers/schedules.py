"""Per-update learning-rate and weight-decay schedules as pure functions of the update index.

``step`` is the 0-based index of the optimizer update the LR is used for; ``total_steps`` is the
number of updates in the run. The trainer calls :func:`apply_schedule` at the start of every
accumulation window, which sets ``group["lr"] = lr_at(step) * group["lr_scale"]`` for every group
(ConvNeXt-V2 ``adjust_learning_rate``), so a run resumed at step k gets exactly the LR an
uninterrupted run has at step k: nothing is stateful.

Warmup (every schedule): for ``step < warmup_steps`` the LR is ``base_lr * w(step)`` with
``w = s0 + (1 - s0) * step / warmup_steps`` (``linear``) or ``w = s0`` (``constant``), where
``s0 = warmup_start_factor`` (0 by default, as ConvNeXt-V2 and BasicTS; STMixer uses 1/3 or 0.1).

After warmup (W = warmup_steps, T = total_steps, p = (step - W) / (T - W)):

``cosine``            ConvNeXt-V2: ``min_lr + (base - min_lr) * (1 + cos(pi * p)) / 2``.
``multistep``/``step`` STMixer ``WarmupMultiStepLR``: ``base * w(step) * gamma ** bisect_right(milestones, step)``;
                       a milestone m applies from update m on, also during warmup. ``step`` uses
                       milestones every ``step_size`` updates.
``half_cosine``       STMixer ``HalfPeriodCosStepLR``: ``base * (1 + cos(pi * step / T)) / 2`` on the
                       *absolute* step, so the LR drops at the end of warmup (e.g. W = T/6: 1 -> 0.933).
``cosine_restarts``   HF/BasicTS ``CosineWarmupRestarts``: ``cycles`` hard restarts of a half cosine,
                       ``(1 + cos(pi * ((cycles * p) mod 1))) / 2``.
``linear``            HF: linear from base to min_lr.
``constant``          base after warmup.
``poly``              HF polynomial: ``min_lr + (base - min_lr) * (1 - p) ** power``.

``min_lr`` is the floor of ``cosine``, ``cosine_restarts``, ``linear`` and ``poly`` (HF's formulas are
the case ``min_lr = 0``); ``multistep``, ``step``, ``half_cosine`` and ``constant`` ignore it, as
their sources do. Past ``total_steps`` decaying schedules hold their end value.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

WARMUP_MODES = ("linear", "constant")


@dataclass(frozen=True)
class LRSchedule:
    """A validated LR schedule; ``lr_at(step)`` is the base LR (before ``lr_scale``) for update ``step``."""

    name: str
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_mode: str = "linear"
    warmup_start_factor: float = 0.0
    min_lr: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    step_size: int | None = None
    cycles: int = 1
    power: float = 1.0

    def warmup_factor(self, step: int) -> float:
        if step >= self.warmup_steps:
            return 1.0
        s0 = self.warmup_start_factor
        if self.warmup_mode == "constant":
            return s0
        return s0 + (1.0 - s0) * step / self.warmup_steps

    def progress(self, step: int) -> float:
        """Fraction of the post-warmup phase done at ``step``, clamped to [0, 1]."""
        span = self.total_steps - self.warmup_steps
        return min(max((step - self.warmup_steps) / span, 0.0), 1.0)

    def lr_at(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return SCHEDULES[self.name](self, step)

    def values(self, steps: int | None = None) -> list[float]:
        """The LR at every update ``0 .. steps-1`` (``total_steps`` by default)."""
        return [self.lr_at(k) for k in range(self.total_steps if steps is None else steps)]

    def describe(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _with_warmup(decay: Callable[[LRSchedule, int], float]) -> Callable[[LRSchedule, int], float]:
    """Warmup towards base_lr, then ``decay`` (which sees the full step)."""

    def fn(s: LRSchedule, step: int) -> float:
        if step < s.warmup_steps:
            return s.base_lr * s.warmup_factor(step)
        return decay(s, step)

    return fn


def _floor(s: LRSchedule, factor: float) -> float:
    return s.min_lr + (s.base_lr - s.min_lr) * factor


def _cosine(s: LRSchedule, step: int) -> float:
    return _floor(s, 0.5 * (1.0 + math.cos(math.pi * s.progress(step))))


def _multistep(s: LRSchedule, step: int) -> float:
    return s.base_lr * s.warmup_factor(step) * s.gamma ** bisect.bisect_right(s.milestones, step)


def _step(s: LRSchedule, step: int) -> float:
    return s.base_lr * s.warmup_factor(step) * s.gamma ** (step // s.step_size)


def _half_cosine(s: LRSchedule, step: int) -> float:
    return s.base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, s.total_steps) / s.total_steps))


def _cosine_restarts(s: LRSchedule, step: int) -> float:
    p = (step - s.warmup_steps) / max(1, s.total_steps - s.warmup_steps)
    if p >= 1.0:
        return s.min_lr
    return _floor(s, max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((s.cycles * p) % 1.0)))))


def _linear(s: LRSchedule, step: int) -> float:
    return _floor(s, 1.0 - s.progress(step))


def _constant(s: LRSchedule, step: int) -> float:
    return s.base_lr


def _poly(s: LRSchedule, step: int) -> float:
    return _floor(s, (1.0 - s.progress(step)) ** s.power)


SCHEDULES: dict[str, Callable[[LRSchedule, int], float]] = {
    "cosine": _with_warmup(_cosine),
    "multistep": _multistep,
    "step": _step,
    "half_cosine": _with_warmup(_half_cosine),
    "cosine_restarts": _with_warmup(_cosine_restarts),
    "linear": _with_warmup(_linear),
    "constant": _with_warmup(_constant),
    "poly": _with_warmup(_poly),
}
SCHEDULE_NAMES: tuple[str, ...] = tuple(SCHEDULES)


def build_lr_schedule(
    name: str,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_mode: str = "linear",
    warmup_start_factor: float = 0.0,
    min_lr: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    step_size: int | None = None,
    cycles: int = 1,
    power: float = 1.0,
) -> LRSchedule:
    """A validated :class:`LRSchedule`; every bad argument raises a ValueError naming it."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {', '.join(SCHEDULE_NAMES)}")
    if not base_lr > 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr!r}")
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if warmup_steps >= total_steps and warmup_steps > 0:
        raise ValueError(
            f"warmup ({warmup_steps} updates) is not shorter than training ({total_steps} updates); "
            "shorten warmup_epochs / warmup_steps or train longer"
        )
    if warmup_mode not in WARMUP_MODES:
        raise ValueError(f"warmup_mode must be one of {list(WARMUP_MODES)}, got {warmup_mode!r}")
    if not 0.0 <= warmup_start_factor <= 1.0:
        raise ValueError(f"warmup_start_factor must be in [0, 1], got {warmup_start_factor!r}")
    if not 0.0 <= min_lr <= base_lr:
        raise ValueError(f"min_lr must be in [0, base_lr={base_lr:g}], got {min_lr!r}")
    milestones = tuple(int(m) for m in milestones)
    if any(m < 0 for m in milestones):
        raise ValueError(f"milestones must be >= 0, got {list(milestones)}")
    if any(b <= a for a, b in zip(milestones, milestones[1:], strict=False)):
        raise ValueError(f"milestones must be strictly increasing, got {list(milestones)}")
    if name == "multistep" and not milestones:
        raise ValueError("schedule 'multistep' needs milestones (e.g. milestones: [30, 60] epochs)")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    if name == "step" and (step_size is None or int(step_size) != step_size or step_size < 1):
        raise ValueError(f"schedule 'step' needs step_size >= 1 update, got {step_size!r}")
    if int(cycles) != cycles or cycles < 1:
        raise ValueError(f"cycles must be an integer >= 1, got {cycles!r}")
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power!r}")
    return LRSchedule(
        name=name, base_lr=float(base_lr), total_steps=int(total_steps), warmup_steps=int(warmup_steps),
        warmup_mode=warmup_mode, warmup_start_factor=float(warmup_start_factor), min_lr=float(min_lr),
        milestones=milestones, gamma=float(gamma), step_size=None if step_size is None else int(step_size),
        cycles=int(cycles), power=float(power),
    )


@dataclass(frozen=True)
class WDSchedule:
    """Weight decay per update: cosine from ``weight_decay`` to ``weight_decay_end`` (constant if None).

    ConvNeXt-V2 parses ``--weight_decay_end`` but never applies it; this is the schedule its unused
    ``cosine_scheduler`` helper describes (no warmup), evaluated in closed form.
    """

    weight_decay: float
    weight_decay_end: float | None
    total_steps: int

    def wd_at(self, step: int) -> float:
        if self.weight_decay_end is None:
            return self.weight_decay
        p = min(max(step, 0), self.total_steps) / self.total_steps
        return self.weight_decay_end + 0.5 * (self.weight_decay - self.weight_decay_end) * (1 + math.cos(math.pi * p))


def build_wd_schedule(weight_decay: float, weight_decay_end: float | None, total_steps: int) -> WDSchedule:
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if weight_decay_end is not None and weight_decay_end < 0:
        raise ValueError(f"weight_decay_end must be >= 0, got {weight_decay_end!r}")
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    return WDSchedule(float(weight_decay), None if weight_decay_end is None else float(weight_decay_end),
                      int(total_steps))


def apply_schedule(optimizer, lr: float, weight_decay: float | None = None) -> None:
    """Set every group's LR to ``lr * lr_scale`` and, for decayed groups, the weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if weight_decay is not None and "wd_scale" in group:
            group["weight_decay"] = weight_decay * group["wd_scale"]


def steps_from_epochs(epochs: float, updates_per_epoch: int) -> int:
    """Updates in ``epochs`` (fractional epochs allowed), rounded to the nearest update."""
    return int(round(epochs * updates_per_epoch))


def build_epoch_schedule(
    name: str,
    *,
    base_lr: float,
    epochs: float,
    updates_per_epoch: int,
    warmup_epochs: float = 0.0,
    warmup_steps: int | None = None,
    milestones: Sequence[float] = (),
    step_size: float | None = None,
    **options: Any,
) -> LRSchedule:
    """:func:`build_lr_schedule` with epoch-based lengths (how configs and the CLI state them).

    ``warmup_steps`` (updates) overrides ``warmup_epochs``; ``milestones`` and ``step_size`` are in
    epochs and become update indices. ``options`` are the remaining :func:`build_lr_schedule` options.
    """
    if int(updates_per_epoch) != updates_per_epoch or updates_per_epoch < 1:
        raise ValueError(f"updates per epoch must be an integer >= 1, got {updates_per_epoch!r}")
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs!r}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
    total = steps_from_epochs(epochs, updates_per_epoch)
    warmup = warmup_steps if warmup_steps is not None else steps_from_epochs(warmup_epochs, updates_per_epoch)
    return build_lr_schedule(
        name, base_lr=base_lr, total_steps=total, warmup_steps=warmup,
        milestones=[steps_from_epochs(m, updates_per_epoch) for m in milestones],
        step_size=None if step_size is None else max(1, steps_from_epochs(step_size, updates_per_epoch)),
        **options,
    )
