"""Every schedule against its closed form (reference optim_semantics.md §1.5, §4.4, §5.2)."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.schedules import (
    SCHEDULE_NAMES,
    apply_schedule,
    build_epoch_schedule,
    build_lr_schedule,
    build_wd_schedule,
)

BASE, MIN = 1e-3, 1e-6


def cnv2_adjust_learning_rate(epoch_float, lr, min_lr, warmup_epochs, epochs):
    """ConvNeXt-V2 utils.adjust_learning_rate, restated from the reference §1.5."""
    if epoch_float < warmup_epochs:
        return lr * epoch_float / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch_float - warmup_epochs) / (epochs - warmup_epochs)))


def test_cosine_matches_convnextv2_per_update():
    upe, epochs, warmup = 7, 10, 2
    s = build_epoch_schedule("cosine", base_lr=BASE, epochs=epochs, updates_per_epoch=upe, warmup_epochs=warmup, min_lr=MIN)
    assert s.total_steps == 70 and s.warmup_steps == 14
    for k in range(s.total_steps):
        assert s.lr_at(k) == pytest.approx(cnv2_adjust_learning_rate(k / upe, BASE, MIN, warmup, epochs), rel=1e-12, abs=1e-18)
    assert s.lr_at(0) == 0.0 and s.lr_at(14) == pytest.approx(BASE)


def test_cosine_matches_timm_cosine_scheduler():
    from timm.scheduler import create_scheduler_v2

    upe, epochs, warmup = 5, 8, 2
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [param], "lr_scale": 0.5}], lr=BASE)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=epochs - warmup, warmup_epochs=warmup,
                                   warmup_prefix=True, warmup_lr=0, min_lr=MIN, step_on_epochs=False,
                                   updates_per_epoch=upe)
    ours = build_epoch_schedule("cosine", base_lr=BASE, epochs=epochs, updates_per_epoch=upe, warmup_epochs=warmup, min_lr=MIN)
    for k in range(ours.total_steps):
        sched.step_update(k)
        assert opt.param_groups[0]["lr"] == pytest.approx(ours.lr_at(k) * 0.5, rel=1e-12, abs=1e-18), k


def stmixer_warmup(t, W, factor, method="linear"):
    if t >= W:
        return 1.0
    if method == "constant":
        return factor
    alpha = t / W
    return factor * (1 - alpha) + alpha


def test_multistep_stmixer_semantics():
    W, milestones, gamma, f = 4, [10, 15], 0.1, 1 / 3
    s = build_lr_schedule("multistep", base_lr=BASE, total_steps=20, warmup_steps=W, warmup_start_factor=f,
                          milestones=milestones, gamma=gamma)
    for t in range(20):
        decays = sum(m <= t for m in milestones)  # bisect_right: milestone m applies from t = m on
        assert s.lr_at(t) == pytest.approx(BASE * stmixer_warmup(t, W, f) * gamma ** decays)
    assert s.lr_at(9) == pytest.approx(BASE) and s.lr_at(10) == pytest.approx(BASE * 0.1)
    assert s.lr_at(14) == pytest.approx(BASE * 0.1) and s.lr_at(15) == pytest.approx(BASE * 0.01)
    # milestones count during warmup too, as WarmupMultiStepLR does
    early = build_lr_schedule("multistep", base_lr=1.0, total_steps=10, warmup_steps=4, warmup_start_factor=0.5,
                              milestones=[2])
    assert early.lr_at(3) == pytest.approx(stmixer_warmup(3, 4, 0.5) * 0.1)


def test_constant_warmup_mode():
    s = build_lr_schedule("multistep", base_lr=1.0, total_steps=10, warmup_steps=3, warmup_mode="constant",
                          warmup_start_factor=0.25, milestones=[8])
    assert [s.lr_at(k) for k in range(4)] == [0.25, 0.25, 0.25, 1.0]


def test_step_schedule_every_step_size():
    s = build_epoch_schedule("step", base_lr=1.0, epochs=9, updates_per_epoch=2, step_size=3, gamma=0.5)
    assert [s.lr_at(k) for k in (0, 5, 6, 11, 12, 17)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_half_cosine_reproduces_the_drop_at_end_of_warmup():
    upe = 10
    s = build_epoch_schedule("half_cosine", base_lr=1.0, epochs=12, updates_per_epoch=upe, warmup_epochs=2,
                             warmup_start_factor=1 / 3)
    W, T = 20, 120
    for t in (0, 5, 19):
        assert s.lr_at(t) == pytest.approx(stmixer_warmup(t, W, 1 / 3))
    for t in (20, 60, 119):
        assert s.lr_at(t) == pytest.approx(0.5 * (1 + math.cos(math.pi * t / T)))  # absolute t, no offset
    assert s.lr_at(W) == pytest.approx(0.9330127, rel=1e-6)  # the documented drop: 1 -> 0.933
    assert s.lr_at(W - 1) > s.lr_at(W)


def hf_restarts(s, W, T, c):
    if s < W:
        return s / max(1, W)
    p = (s - W) / max(1, T - W)
    if p >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((c * p) % 1.0))))


@pytest.mark.parametrize("cycles", [1, 3])
def test_cosine_restarts_hf_semantics(cycles):
    W, T = 5, 65
    s = build_lr_schedule("cosine_restarts", base_lr=BASE, total_steps=T, warmup_steps=W, cycles=cycles)
    for k in range(T + 3):
        assert s.lr_at(k) == pytest.approx(BASE * hf_restarts(k, W, T, cycles), abs=1e-15)
    if cycles == 3:  # restart points: back to the peak at the start of each cycle
        assert s.lr_at(W + 20) == pytest.approx(BASE) and s.lr_at(W + 40) == pytest.approx(BASE)
        assert s.lr_at(W + 19) < 0.01 * BASE


def test_linear_constant_poly_closed_forms():
    W, T = 4, 24
    lin = build_lr_schedule("linear", base_lr=BASE, total_steps=T, warmup_steps=W)
    const = build_lr_schedule("constant", base_lr=BASE, total_steps=T, warmup_steps=W)
    poly = build_lr_schedule("poly", base_lr=BASE, total_steps=T, warmup_steps=W, power=2.0, min_lr=MIN)
    for k in range(T):
        warm = k / W
        assert lin.lr_at(k) == pytest.approx(BASE * (warm if k < W else max(0.0, (T - k) / (T - W))))
        assert const.lr_at(k) == pytest.approx(BASE * (warm if k < W else 1.0))
        want_poly = BASE * warm if k < W else MIN + (BASE - MIN) * (1 - (k - W) / (T - W)) ** 2
        assert poly.lr_at(k) == pytest.approx(want_poly)
    assert lin.lr_at(T) == 0.0 and poly.lr_at(T + 5) == pytest.approx(MIN)


def closed_form(name, k, *, base, min_lr, W, T, milestones, step_size, gamma=0.1, cycles=1, power=1.0):
    """The documented formula of every schedule (docs/optim.md), written out without the module's helpers."""
    warm = k / W if k < W else 1.0  # linear warmup from 0
    if name == "multistep":
        return base * warm * gamma ** len([m for m in milestones if m <= k])
    if name == "step":
        return base * warm * gamma ** (k // step_size)
    if k < W:
        return base * warm
    p = min((k - W) / (T - W), 1.0)
    if name == "cosine":
        return min_lr + (base - min_lr) * (1 + math.cos(math.pi * p)) / 2
    if name == "half_cosine":
        return base * (1 + math.cos(math.pi * min(k, T) / T)) / 2
    if name == "cosine_restarts":
        return min_lr if p >= 1 else min_lr + (base - min_lr) * (1 + math.cos(math.pi * ((cycles * p) % 1))) / 2
    if name == "linear":
        return min_lr + (base - min_lr) * (1 - p)
    if name == "constant":
        return base
    if name == "poly":
        return min_lr + (base - min_lr) * (1 - p) ** power
    raise AssertionError(f"no closed form for {name}")


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_resume_at_any_step_gives_the_closed_form_lr(name):
    """A resumed run rebuilds the schedule from its config and queries update k: it must give the closed-form
    value of update k, the value an uninterrupted run used (schedules hold no state)."""
    opts = {"milestones": [30, 60], "step_size": 25, "cycles": 2, "power": 2.0}
    args = {"base_lr": BASE, "total_steps": 100, "warmup_steps": 10, "min_lr": MIN}
    uninterrupted = build_lr_schedule(name, **args, **opts)
    for k in range(0, 103):
        want = closed_form(name, k, base=BASE, min_lr=MIN, W=10, T=100, milestones=[30, 60], step_size=25,
                           cycles=2, power=2.0)
        assert uninterrupted.lr_at(k) == pytest.approx(want, rel=1e-12, abs=1e-18), k
    for k in (0, 9, 10, 37, 99):
        resumed = build_lr_schedule(name, **args, **opts)
        assert resumed.lr_at(k) == pytest.approx(closed_form(name, k, base=BASE, min_lr=MIN, W=10, T=100,
                                                             milestones=[30, 60], step_size=25, cycles=2,
                                                             power=2.0), rel=1e-12, abs=1e-18)


def test_weight_decay_schedule_and_apply():
    wd = build_wd_schedule(0.05, 0.5, 100)
    assert wd.wd_at(0) == pytest.approx(0.05) and wd.wd_at(100) == pytest.approx(0.5)
    assert wd.wd_at(50) == pytest.approx(0.5 + 0.5 * (0.05 - 0.5))
    assert build_wd_schedule(0.05, None, 10).wd_at(7) == 0.05
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([
        {"params": [p1], "lr_scale": 0.25, "weight_decay": 0.05, "wd_scale": 1.0},
        {"params": [p2], "lr_scale": 1.0, "weight_decay": 0.0, "wd_scale": 0.0},
    ], lr=1.0)
    apply_schedule(opt, 0.004, weight_decay=0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.004]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    apply_schedule(opt, 0.004, weight_decay=0.0)
    apply_schedule(opt, 0.004, weight_decay=0.2)  # a decayed group stays decayed after passing through 0
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "cosine_annealing"}, "unknown schedule 'cosine_annealing'; valid schedules: cosine"),
    ({"warmup_steps": 100}, r"warmup \(100 updates\) is not shorter than training \(100 updates\)"),
    ({"warmup_steps": 150}, "not shorter than training"),
    ({"name": "multistep", "milestones": [50, 20]}, "milestones must be strictly increasing"),
    ({"name": "multistep", "milestones": []}, "needs milestones"),
    ({"name": "step"}, "needs step_size"),
    ({"base_lr": 0.0}, "base_lr must be > 0"),
    ({"min_lr": 1.0}, "min_lr must be in"),
    ({"cycles": 0}, "cycles must be an integer >= 1"),
    ({"power": -1.0}, "power must be > 0"),
    ({"warmup_mode": "exp"}, "warmup_mode must be one of"),
    ({"warmup_start_factor": 1.5}, r"warmup_start_factor must be in \[0, 1\]"),
])
def test_bad_schedule_arguments(kwargs, match):
    args = {"name": "cosine", "base_lr": BASE, "total_steps": 100} | kwargs
    with pytest.raises(ValueError, match=match):
        build_lr_schedule(args.pop("name"), **args)


def test_warmup_longer_than_training_in_epochs():
    with pytest.raises(ValueError, match="shorten warmup_epochs"):
        build_epoch_schedule("cosine", base_lr=BASE, epochs=5, updates_per_epoch=10, warmup_epochs=5)
