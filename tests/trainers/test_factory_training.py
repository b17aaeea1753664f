"""A short real training run with the factory: every group's LR is schedule x lr_scale at every update,
and no-decay groups really get no weight decay."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from trainers.optim import create_optimizer
from trainers.param_groups import build_param_groups
from trainers.schedules import apply_schedule, build_lr_schedule, build_wd_schedule


@pytest.mark.parametrize("optimizer", ["adamw", "lookahead_adamw"])
def test_twenty_updates_follow_schedule_times_lr_scale(optimizer):
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=10)
    groups = build_param_groups(model, layer_decay=0.8, weight_decay=0.05)
    opt = create_optimizer(optimizer, groups, lr=2e-3)
    steps = 20
    lr_sched = build_lr_schedule("cosine", base_lr=2e-3, total_steps=steps, warmup_steps=5, min_lr=1e-5)
    wd_sched = build_wd_schedule(0.05, 0.2, steps)
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    seen_scales = set()
    for step in range(steps):
        apply_schedule(opt, lr_sched.lr_at(step), wd_sched.wd_at(step))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:  # checked after the step: what the update actually used
            assert g["lr"] == pytest.approx(lr_sched.lr_at(step) * g["lr_scale"], rel=1e-12, abs=1e-20)
            want_wd = wd_sched.wd_at(step) if g["name"].endswith("_decay") and not g["name"].endswith("no_decay") else 0.0
            assert g["weight_decay"] == pytest.approx(want_wd)
            seen_scales.add(round(g["lr_scale"], 9))
    assert len(seen_scales) == 13  # ids 1..13 of atto in single mode
    assert loss.item() < 2.3  # it trained on the fixed batch


def test_no_decay_parameters_are_not_decayed():
    """With zero gradients, one AdamW update changes a parameter only through decoupled weight decay:
    decayed tensors shrink by exactly (1 - lr * lr_scale * wd), no-decay tensors stay bit-identical."""
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=10)
    with torch.no_grad():  # make every tensor non-zero, so a decay would show
        for p in model.parameters():
            p.add_(0.5)
    groups = build_param_groups(model, layer_decay=0.8, weight_decay=0.1)
    opt = create_optimizer("adamw", groups, lr=0.01)
    apply_schedule(opt, 0.01)
    before = {n: p.detach().clone() for g in groups for n, p in zip(g["param_names"], g["params"], strict=True)}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    checked_decay = checked_no_decay = 0
    for g in opt.param_groups:
        for n, p in zip(g["param_names"], g["params"], strict=True):
            if g["weight_decay"] == 0.0:
                assert torch.equal(p, before[n]), n
                checked_no_decay += 1
            else:
                factor = 1 - 0.01 * g["lr_scale"] * 0.1
                torch.testing.assert_close(p, before[n] * factor)
                checked_decay += 1
    assert (checked_decay, checked_no_decay) == (41, 99)
