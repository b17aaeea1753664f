"""Parameter groups and layer-id rules against the figures of the reference (optim_semantics.md §1.3, §2.3, §4.3)."""

from __future__ import annotations

import fnmatch
import logging

import pytest
import timm
import torch
import torch.nn as nn

from trainers.layer_decay import get_layer_rule, layer_scales, normalize_param_name
from trainers.param_groups import build_param_groups, group_summaries, param_group_table, param_records


@pytest.fixture(scope="module")
def models():
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = timm.create_model(name, pretrained=False)
        return cache[name]

    return get


def scale_of(groups, param_name):
    for g in groups:
        if param_name in g["param_names"]:
            return g["layer_id"], g["lr_scale"], g["weight_decay"]
    raise KeyError(param_name)


@pytest.mark.parametrize("name,decay,no_decay", [
    ("convnextv2_atto", 41, 99), ("convnextv2_tiny", 59, 141), ("convnextv2_base", 113, 267),
])
def test_decay_no_decay_tensor_counts(models, name, decay, no_decay):
    groups = build_param_groups(models(name), layer_decay=1.0, weight_decay=0.05)
    assert [(g["name"], len(g["params"])) for g in groups] == [("decay", decay), ("no_decay", no_decay)]
    assert all(g["lr_scale"] == 1.0 for g in groups)
    # decayed tensors are exactly the conv and linear weights
    for n in groups[0]["param_names"]:
        assert n.endswith(".weight") and "norm" not in n and "grn" not in n


@pytest.mark.parametrize("name,single,group", [
    ("convnextv2_atto", 26, 14), ("convnextv2_tiny", 38, 16), ("convnextv2_base", 74, 28),
])
def test_group_counts_with_layer_decay(models, name, single, group):
    model = models(name)
    assert len(build_param_groups(model, layer_decay=0.8, layer_decay_type="single")) == single
    assert len(build_param_groups(model, layer_decay=0.8, layer_decay_type="group")) == group


# (parameter, single id, single scale, group id, group scale) at d = 0.8 — reference §2.3
ATTO = [
    ("stem.0.weight", 1, 0.0687195, 0, 0.0549756),
    ("stages.0.blocks.0.conv_dw.weight", 1, 0.0687195, 1, 0.0687195),
    ("stages.0.blocks.1.mlp.fc1.weight", 2, 0.0858993, 1, 0.0687195),
    ("stages.1.downsample.1.weight", 3, 0.107374, 2, 0.0858993),
    ("stages.1.blocks.0.mlp.grn.weight", 3, 0.107374, 2, 0.0858993),
    ("stages.1.blocks.1.norm.weight", 4, 0.134218, 2, 0.0858993),
    ("stages.2.downsample.0.weight", 5, 0.167772, 3, 0.107374),
    ("stages.2.blocks.0.mlp.fc2.weight", 5, 0.167772, 3, 0.107374),
    ("stages.2.blocks.3.conv_dw.weight", 8, 0.32768, 4, 0.134218),
    ("stages.2.blocks.5.conv_dw.bias", 10, 0.512, 4, 0.134218),
    ("stages.3.downsample.1.bias", 11, 0.64, 12, 0.8),
    ("stages.3.blocks.0.mlp.fc1.weight", 11, 0.64, 12, 0.8),
    ("stages.3.blocks.1.mlp.fc1.weight", 12, 0.8, 12, 0.8),
    ("head.norm.weight", 13, 1.0, 13, 1.0),
    ("head.fc.weight", 13, 1.0, 13, 1.0),
]
TINY = [
    ("stem.1.bias", 1, 0.0180144, 0, 0.0549756),
    ("stages.0.blocks.0.conv_dw.weight", 1, 0.0180144, 1, 0.0687195),
    ("stages.0.blocks.2.conv_dw.weight", 3, 0.0281475, 1, 0.0687195),
    ("stages.1.downsample.0.weight", 4, 0.0351844, 2, 0.0858993),
    ("stages.1.blocks.0.mlp.fc1.weight", 4, 0.0351844, 2, 0.0858993),
    ("stages.1.blocks.2.mlp.fc1.weight", 6, 0.0549756, 2, 0.0858993),
    ("stages.2.downsample.1.weight", 7, 0.0687195, 3, 0.107374),
    ("stages.2.blocks.0.mlp.fc1.weight", 7, 0.0687195, 3, 0.107374),
    ("stages.2.blocks.5.mlp.fc1.weight", 12, 0.209715, 4, 0.134218),
    ("stages.2.blocks.8.mlp.fc1.weight", 15, 0.4096, 5, 0.167772),
    ("stages.3.downsample.1.weight", 16, 0.512, 12, 0.8),
    ("stages.3.blocks.0.mlp.fc1.weight", 16, 0.512, 12, 0.8),
    ("stages.3.blocks.2.mlp.fc2.bias", 18, 0.8, 12, 0.8),
    ("head.fc.bias", 19, 1.0, 13, 1.0),
]


@pytest.mark.parametrize("name,table", [("convnextv2_atto", ATTO), ("convnextv2_tiny", TINY)])
@pytest.mark.parametrize("mode", ["single", "group"])
def test_lr_scale_per_parameter(models, name, table, mode):
    groups = build_param_groups(models(name), layer_decay=0.8, layer_decay_type=mode)
    for param, s_id, s_scale, g_id, g_scale in table:
        want_id, want_scale = (s_id, s_scale) if mode == "single" else (g_id, g_scale)
        layer_id, scale, _ = scale_of(groups, param)
        assert layer_id == want_id, param
        assert scale == pytest.approx(want_scale, rel=1e-5), param


def test_every_convnextv2_variant_has_rules():
    for name in timm.list_models("convnextv2_*"):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        depths = [len(s.blocks) for s in model.stages]
        single = get_layer_rule(model, name, "single")
        assert single.num_layers == sum(depths)
        ids = {single.layer_id(n) for n, _ in model.named_parameters()}
        assert ids == set(range(1, sum(depths) + 2)), name  # ids 1..L+1, as ConvNeXt-V2's single rule
        group = get_layer_rule(model, name, "group")
        assert group.num_layers == 12
        assert max(group.layer_id(n) for n, _ in model.named_parameters()) == 13


def test_vit_b_rule_at_075(models):
    model = models("vit_base_patch16_224")
    groups = build_param_groups(model, layer_decay=0.75, weight_decay=0.05)
    want = [0.0237573, 0.0316764, 0.0422351, 0.0563135, 0.0750847, 0.100113, 0.133484, 0.177979, 0.237305,
            0.316406, 0.421875, 0.5625, 0.75, 1.0]
    assert layer_scales(0.75, 12) == pytest.approx(want, rel=1e-5)
    for param, layer in [("cls_token", 0), ("pos_embed", 0), ("patch_embed.proj.weight", 0),
                         ("blocks.0.attn.qkv.weight", 1), ("blocks.11.mlp.fc2.weight", 12),
                         ("norm.weight", 13), ("head.weight", 13)]:
        layer_id, scale, _ = scale_of(groups, param)
        assert (layer_id, scale) == (layer, pytest.approx(want[layer], rel=1e-5)), param
    # the model's own no_weight_decay() set is honoured (pos_embed is 3-D, so only that rule exempts it)
    assert scale_of(groups, "pos_embed")[2] == 0.0
    assert scale_of(groups, "blocks.3.attn.proj.weight")[2] == 0.05


def test_layer_decay_one_gives_unit_scales(models):
    groups = build_param_groups(models("convnextv2_atto"), layer_decay=1.0)
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert {g["layer_id"] for g in groups} == {None}


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.01, 2.0])
def test_layer_decay_out_of_range_is_rejected(models, bad):
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
        build_param_groups(models("convnextv2_atto"), layer_decay=bad)


def test_unknown_family_lists_known_families():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="families with a rule: convnextv2") as info:
        build_param_groups(model, model_name="resnet50", layer_decay=0.8)
    assert "vit" in str(info.value)
    # without layer decay any model works
    assert len(build_param_groups(model, model_name="resnet50")) == 2


def test_unknown_layer_decay_type(models):
    with pytest.raises(ValueError, match="layer_decay_type must be one of"):
        build_param_groups(models("convnextv2_atto"), layer_decay=0.8, layer_decay_type="blocks")


def test_weight_decay_exclusions_and_frozen(models):
    model = timm.create_model("convnextv2_atto", pretrained=False)
    model.stem.requires_grad_(False)
    groups = build_param_groups(model, layer_decay=0.8, weight_decay=0.1, no_weight_decay=["head.fc.*", "stages.3.*.fc1.weight"])
    names = [n for g in groups for n in g["param_names"]]
    assert not any(n.startswith("stem.") for n in names)  # frozen params left out
    assert len(names) == len(set(names)) == sum(p.requires_grad for p in model.parameters())
    for g in groups:
        for n, p in zip(g["param_names"], g["params"], strict=True):
            excluded = p.ndim <= 1 or n.endswith((".bias", ".gamma", ".beta")) or fnmatch.fnmatch(n, "head.fc.*") \
                or fnmatch.fnmatch(n, "stages.3.*.fc1.weight")
            assert g["weight_decay"] == (0.0 if excluded else 0.1), n
            assert g["wd_scale"] == (0.0 if excluded else 1.0)
    assert scale_of(groups, "head.fc.weight")[2] == 0.0


def test_gamma_beta_names_excluded_even_when_not_1d():
    class GRN(nn.Module):  # ConvNeXt-V2's own GRN has 4-D gamma/beta
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.zeros(1, 1, 1, 8))
            self.beta = nn.Parameter(torch.zeros(1, 1, 1, 8))
            self.weight = nn.Parameter(torch.zeros(8, 8))

    groups = build_param_groups(nn.Sequential(GRN()), weight_decay=0.05)
    by_name = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert by_name == {"0.gamma": 0.0, "0.beta": 0.0, "0.weight": 0.05}


def test_wrapped_names_resolve_like_unwrapped(models):
    model = models("convnextv2_atto")
    plain = build_param_groups(model, model_name="convnextv2_atto", layer_decay=0.8)

    class Wrapper(nn.Module):  # the attribute layout DDP (`module`) and torch.compile (`_orig_mod`) produce
        def __init__(self, inner, attr):
            super().__init__()
            setattr(self, attr, inner)

    for wrapped in (Wrapper(model, "module"), Wrapper(Wrapper(model, "_orig_mod"), "module")):
        groups = build_param_groups(wrapped, layer_decay=0.8)  # family found through the wrappers
        assert [(g["name"], g["lr_scale"], g["param_names"]) for g in groups] == \
            [(g["name"], g["lr_scale"], g["param_names"]) for g in plain]
    assert normalize_param_name("module._orig_mod.stages.0.blocks.0.norm.weight") == "stages.0.blocks.0.norm.weight"


def test_table_and_records(models):
    model = models("convnextv2_atto")
    groups = build_param_groups(model, layer_decay=0.8)
    table = param_group_table(groups)
    lines = table.splitlines()
    assert lines[0].split() == ["group", "layer", "tensors", "params", "lr_scale", "wd"]
    assert len(lines) == 2 + len(groups) + 2
    assert lines[-1].split()[:3] == ["total", "140", f"{sum(p.numel() for p in model.parameters()):,}"]
    rows = group_summaries(groups)
    assert sum(r["tensors"] for r in rows) == 140
    records = param_records(model, build_param_groups(model), model_name="convnextv2_atto")
    assert len(records) == 140
    stem = next(r for r in records if r["name"] == "stem.0.weight")
    assert stem["layer_id"] == 1 and stem["lr_scale"] == 1.0  # rule id reported even without layer decay


# convnextv2_base at the official recipe's d = 0.6 (reference §2.3: group scale 0.6 ** (13 - id); single: L = 36)
BASE_06 = [
    ("stem.0.weight", 1, 0.6 ** 36, 0, 0.00130607),
    ("stages.0.blocks.2.mlp.fc1.weight", 3, 0.6 ** 34, 1, 0.00217678),
    ("stages.1.downsample.1.weight", 4, 0.6 ** 33, 2, 0.00362797),
    ("stages.1.blocks.2.conv_dw.weight", 6, 0.6 ** 31, 2, 0.00362797),
    ("stages.2.downsample.1.weight", 7, 0.6 ** 30, 3, 0.00604662),
    ("stages.2.blocks.2.mlp.fc2.weight", 9, 0.6 ** 28, 3, 0.00604662),
    ("stages.2.blocks.3.conv_dw.weight", 10, 0.6 ** 27, 4, 0.0100777),
    ("stages.2.blocks.14.mlp.fc1.weight", 21, 0.6 ** 16, 7, 0.046656),
    ("stages.2.blocks.24.norm.weight", 31, 0.6 ** 6, 11, 0.36),
    ("stages.2.blocks.26.mlp.grn.bias", 33, 0.6 ** 4, 11, 0.36),
    ("stages.3.downsample.0.weight", 34, 0.6 ** 3, 12, 0.6),
    ("stages.3.blocks.2.mlp.fc2.weight", 36, 0.6, 12, 0.6),
    ("head.fc.weight", 37, 1.0, 13, 1.0),
]


@pytest.mark.parametrize("mode", ["single", "group"])
def test_lr_scale_per_parameter_on_base_at_the_official_decay(models, mode):
    groups = build_param_groups(models("convnextv2_base"), layer_decay=0.6, layer_decay_type=mode)
    for param, s_id, s_scale, g_id, g_scale in BASE_06:
        want_id, want_scale = (s_id, s_scale) if mode == "single" else (g_id, g_scale)
        layer_id, scale, _ = scale_of(groups, param)
        assert (layer_id, scale) == (want_id, pytest.approx(want_scale, rel=1e-5)), param
    if mode == "group":  # base fills ids 0..13: no gap, no jump
        assert {g["layer_id"] for g in groups} == set(range(14))


def test_group_mode_on_shallow_models_warns_about_the_id_gap(models, caplog):
    with caplog.at_level(logging.WARNING, logger="trainers.param_groups"):
        build_param_groups(models("convnextv2_tiny"), layer_decay=0.6, layer_decay_type="group")
    (record,) = caplog.records
    assert "ids 6..11 unused: 36x from id 5 to id 12" in record.getMessage()  # 0.6 ** -7 = 35.7
    assert "layer_decay_type 'single'" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainers.param_groups"):
        build_param_groups(models("convnextv2_base"), layer_decay=0.6, layer_decay_type="group")
        build_param_groups(models("convnextv2_tiny"), layer_decay=0.6, layer_decay_type="single")
        build_param_groups(models("convnextv2_tiny"), layer_decay=1.0, layer_decay_type="group")
    assert caplog.records == []
