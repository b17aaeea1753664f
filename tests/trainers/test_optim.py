"""Optimizers by name from timm's registry over factory-built groups."""

from __future__ import annotations

import pytest
import timm
import torch

from trainers.optim import create_optimizer, optimizer_names, resolve_lr
from trainers.param_groups import build_param_groups

REQUIRED = ["sgd", "momentum", "nesterov", "adam", "adamw", "nadam", "radam", "adamp", "sgdp", "lamb", "lars",
            "lion", "adafactor", "rmsprop", "rmsproptf"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("convnextv2_atto", pretrained=False, num_classes=4)


def one_step(model, optimizer):
    x = torch.randn(2, 3, 32, 32)
    loss = model(x).logsumexp(dim=1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("name", REQUIRED + ["lookahead_adamw", "lookahead_sgd"])
def test_every_required_optimizer_builds_and_steps(model, name):
    groups = build_param_groups(model, layer_decay=0.8, weight_decay=0.05)
    before = model.head.fc.weight.detach().clone()
    opt = create_optimizer(name, groups, lr=1e-3)
    assert opt.defaults.get("weight_decay", 0.0) == 0.0  # groups carry their own
    assert len(opt.param_groups) == len(groups)
    for g_in, g_opt in zip(groups, opt.param_groups, strict=True):
        assert g_opt["weight_decay"] == g_in["weight_decay"] and g_opt["lr_scale"] == g_in["lr_scale"]
    one_step(model, opt)
    assert not torch.equal(before, model.head.fc.weight)
    if name.startswith("lookahead_"):
        assert type(opt).__name__ == "Lookahead"


def test_hyperparameters_reach_the_optimizer(model):
    groups = build_param_groups(model)
    adamw = create_optimizer("adamw", groups, lr=2e-3, betas=(0.8, 0.95), eps=1e-6)
    assert adamw.param_groups[0]["betas"] == (0.8, 0.95) and adamw.param_groups[0]["eps"] == 1e-6
    assert isinstance(adamw, torch.optim.AdamW)
    sgd = create_optimizer("momentum", build_param_groups(model), lr=0.1, momentum=0.7)
    assert sgd.param_groups[0]["momentum"] == 0.7 and sgd.param_groups[0]["nesterov"] is False
    nesterov = create_optimizer("nesterov", build_param_groups(model), lr=0.1, momentum=0.8)
    assert nesterov.param_groups[0]["nesterov"] is True and nesterov.param_groups[0]["momentum"] == 0.8


def test_unknown_optimizer_lists_valid_names(model):
    with pytest.raises(ValueError, match="unknown optimizer 'adamww'") as info:
        create_optimizer("adamww", build_param_groups(model), lr=1e-3)
    message = str(info.value)
    assert "Did you mean adamw" in message and "lamb" in message and "lookahead_" in message
    with pytest.raises(ValueError, match="unknown optimizer"):
        create_optimizer("swa_adamw", build_param_groups(model), lr=1e-3)
    assert set(REQUIRED) <= set(optimizer_names())


def test_resolve_lr_from_blr():
    # ConvNeXt-V2 TRAINING.md: 8 GPUs x 32 x update_freq 4 = 1024; blr 6.25e-4 -> lr 2.5e-3
    assert resolve_lr(blr=6.25e-4, batch_size=32, accum_steps=4, world_size=8) == pytest.approx(2.5e-3)
    assert resolve_lr(blr=2e-4, batch_size=32, accum_steps=4, world_size=8) == pytest.approx(8e-4)
    assert resolve_lr(blr=5e-4, batch_size=64, accum_steps=1, world_size=1, lr=3e-3) == 3e-3
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        resolve_lr(blr=1e-3, batch_size=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        resolve_lr(blr=1e-3, batch_size=8, lr=-1.0)


def test_bare_parameters_are_refused_instead_of_training_without_weight_decay(model):
    # timm would put them in one group with the optimizer-level weight decay, which the factory sets to 0
    for bare in (model.parameters(), list(model.parameters())):
        with pytest.raises(TypeError, match="bare parameter.*without weight decay; pass build_param_groups"):
            create_optimizer("adamw", bare, lr=1e-3)
    with pytest.raises(TypeError, match="not a model"):
        create_optimizer("adamw", model, lr=1e-3)
    with pytest.raises(ValueError, match="carry no weight_decay"):
        create_optimizer("adamw", [{"params": list(model.parameters())}], lr=1e-3)
