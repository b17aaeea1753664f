"""The factory in a real training run: at every optimizer update of `train_loop_per_worker` each group's LR is
the closed-form schedule x its layer's lr_scale and its weight decay the wd schedule (0 for no-decay groups),
and no-decay parameters really get no weight decay."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from trainers.config import FinetuneConfig
from trainers.loop import LocalReporter, train_loop_per_worker
from trainers.optim import create_optimizer
from trainers.param_groups import build_param_groups
from trainers.schedules import apply_schedule


def cosine_lr(k, *, base, min_lr, warmup, total):
    """ConvNeXt-V2's adjust_learning_rate per update (reference §1.5), linear warmup from 0."""
    if k < warmup:
        return base * k / warmup
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))


@pytest.mark.parametrize("optimizer", ["adamw", "lookahead_adamw"])
def test_every_update_of_the_loop_uses_schedule_times_lr_scale(optimizer):
    cfg = FinetuneConfig(input_size=32, batch_size=16, accum_steps=2, steps_per_epoch_limit=3, epochs=2,
                         warmup_epochs=0.5, layer_decay=0.8, weight_decay=0.05, weight_decay_end=0.2,
                         optimizer=optimizer)
    seen = []  # (lr, weight decay, layer id, decayed) of every group at every optimizer.step, before it runs

    def record(opt, args, kwargs):
        if isinstance(opt, torch.optim.AdamW):  # Lookahead steps its inner AdamW: record that one
            seen.append([(g["lr"], g["weight_decay"], g["layer_id"], not g["name"].endswith("no_decay"))
                         for g in opt.param_groups])

    reporter = LocalReporter()
    handle = register_optimizer_step_pre_hook(record)  # torch's public hook: the loop itself is untouched
    try:
        train_loop_per_worker({"finetune": cfg.to_dict(), "cpus_per_worker": 2}, reporter=reporter)
    finally:
        handle.remove()
    history = reporter.history
    total, warmup, base = 6, 2, 8e-3 * 16 * 2 / 256  # 2 epochs x 3 updates of 2 micro-batches; 0.5 epoch warmup
    assert len(seen) == total and [m["step"] for m in history] == [3, 6]
    for k, groups in enumerate(seen):
        lr = cosine_lr(k, base=base, min_lr=1e-6, warmup=warmup, total=total)
        wd = 0.2 + 0.5 * (0.05 - 0.2) * (1 + math.cos(math.pi * k / total))
        assert len(groups) == 26  # atto, single mode: ids 1..13, decay and no_decay
        for group_lr, group_wd, layer_id, decayed in groups:
            assert group_lr == pytest.approx(lr * 0.8 ** (13 - layer_id), rel=1e-12, abs=1e-20), (k, layer_id)
            assert group_wd == pytest.approx(wd if decayed else 0.0, rel=1e-12), (k, layer_id)
    assert {layer_id for _, _, layer_id, _ in seen[0]} == set(range(1, 14))


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
