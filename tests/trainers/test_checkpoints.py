"""Loading timm, ConvNeXt-V2 finetuned and FCMAE checkpoints (state dicts built here in those layouts)."""

from __future__ import annotations

import argparse
import re

import pytest
import timm
import torch

from trainers.checkpoints import (
    TRAIN_STATE_FILE,
    Best,
    CheckpointMismatchError,
    detect_layout,
    load_pretrained_weights,
    load_training_state,
    read_model_weights,
    save_model_weights,
    save_training_state,
)


def timm_model(name="convnextv2_atto", num_classes=10, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes)


def to_convnextv2_names(state):
    """timm names -> ConvNeXt-V2's own (models/convnextv2.py) names and shapes."""
    out = {}
    for k, v in state.items():
        k = k.replace("stem.", "downsample_layers.0.")
        k = re.sub(r"stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        if "mlp.grn" in k:
            k = k.replace("mlp.grn.weight", "grn.gamma").replace("mlp.grn.bias", "grn.beta")
            v = v.reshape(1, 1, 1, -1)
        k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        if "pwconv" in k and k.endswith("weight"):
            v = v.reshape(v.shape[0], v.shape[1])
        out[k] = v.clone()
    return out


def to_fcmae(cnv2):
    """Dense ConvNeXt-V2 names -> the sparse FCMAE encoder layout, plus decoder keys."""
    out = {}
    for k, v in cnv2.items():
        if k.startswith(("norm.", "head.")):
            continue  # FCMAE has no final norm or head
        if k.endswith("dwconv.weight"):  # (C,1,ks,ks) -> (ks*ks, C) with index x*ks+y
            k, v = k.replace(".weight", ".kernel"), v[:, 0].permute(2, 1, 0).reshape(-1, v.shape[0])
        elif re.match(r"downsample_layers\.[123]\.1\.weight", k):  # (out,in,ks,ks) -> (ks*ks, in, out)
            k, v = k.replace(".weight", ".kernel"), v.permute(3, 2, 1, 0).reshape(-1, v.shape[1], v.shape[0])
        elif re.match(r"downsample_layers\.[123]\.0\.", k) or ".norm." in k:
            k = k.rsplit(".", 1)[0] + ".ln." + k.rsplit(".", 1)[1]
        elif "pwconv" in k:
            k = k.rsplit(".", 1)[0] + ".linear." + k.rsplit(".", 1)[1]
        sparse_bias = k.endswith("bias") and ("dwconv" in k or re.match(r"downsample_layers\.[123]\.1\.", k))
        if "grn" in k or sparse_bias:  # Minkowski keeps these as (1, C)
            v = v.reshape(1, -1)
        out["encoder." + k] = v.clone()
    out.update({"mask_token": torch.zeros(1, 320, 1, 1), "proj.weight": torch.randn(512, 320, 1, 1),
                "decoder.0.dwconv.weight": torch.randn(512, 1, 7, 7), "pred.weight": torch.randn(48, 512, 1, 1)})
    return out


def backbone_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("head."))


def test_timm_checkpoint_with_other_head_keeps_the_fresh_head(tmp_path):
    source = timm_model(num_classes=1000, seed=1)
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = timm_model(num_classes=10, seed=2)
    fresh_head = target.head.fc.weight.clone()
    report = load_pretrained_weights(target, path)
    assert report.layout == "timm"
    assert backbone_equal(source, target)
    assert torch.equal(target.head.fc.weight, fresh_head)
    assert set(report.dropped) == {"head.fc.weight", "head.fc.bias"}
    assert set(report.missing) == {"head.fc.weight", "head.fc.bias"}
    assert torch.equal(target.head.norm.weight, source.head.norm.weight)


def test_convnextv2_finetuned_checkpoint_maps_to_timm(tmp_path):
    source = timm_model(seed=3)
    state = to_convnextv2_names(source.state_dict())
    assert detect_layout(state) == "convnextv2"
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": state, "epoch": 599, "args": argparse.Namespace(model="convnextv2_atto")}, path)
    target = timm_model(seed=4)
    report = load_pretrained_weights(target, path)
    assert report.layout == "convnextv2" and not report.missing and not report.unexpected
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())


def test_fcmae_checkpoint_drops_decoder_and_densifies_kernels(tmp_path):
    source = timm_model(seed=5)
    state = to_fcmae(to_convnextv2_names(source.state_dict()))
    assert detect_layout(state) == "fcmae"
    path = tmp_path / "convnextv2_atto_1k_224_fcmae.pt"
    torch.save({"model": state}, path)
    target = timm_model(seed=6)
    report = load_pretrained_weights(target, path)
    assert report.layout == "fcmae"
    assert backbone_equal(source, target)
    assert {"mask_token", "proj.weight", "pred.weight", "decoder.0.dwconv.weight"} <= set(report.dropped)
    assert set(report.missing) == {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"}
    assert not report.unexpected


@pytest.mark.parametrize("layout", ["timm", "convnextv2"])
def test_checkpoint_of_another_variant_is_rejected(tmp_path, layout):
    femto = timm_model("convnextv2_femto").state_dict()
    path = tmp_path / "femto.pth"
    torch.save({"model": femto if layout == "timm" else to_convnextv2_names(femto)}, path)
    with pytest.raises(CheckpointMismatchError, match="does not (match|fit)"):
        load_pretrained_weights(timm_model(), path, model_name="convnextv2_atto")


def test_unrelated_state_dict_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointMismatchError, match="backbone tensors found"):
        load_pretrained_weights(timm_model(), path)


def test_missing_checkpoint_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained_weights(timm_model(), tmp_path / "nope.pth")


def test_training_state_written_before_best_metric_still_resumes(tmp_path):
    # the format before best_metric: best_val_top1 / best_epoch at the top level
    model = timm_model()
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": None, "model_ema": None,
                "epoch": 3, "step": 30, "config": {}, "best_val_top1": 91.5, "best_epoch": 2},
               tmp_path / TRAIN_STATE_FILE)
    state = load_training_state(tmp_path, model=timm_model(seed=1), optimizer=optimizer, scaler=None, ema=None)
    assert (state.epoch, state.step, state.best) == (3, 30, {"val_top1": (91.5, 2)})


def test_training_state_keeps_every_tracked_best(tmp_path):
    model = timm_model()
    optimizer = torch.optim.AdamW(model.parameters())
    loss, top1 = Best("val_loss", "min"), Best("val_top1", "max")
    for epoch, metrics in enumerate([{"val_loss": 0.9, "val_top1": 50.0}, {"val_loss": 1.1, "val_top1": 60.0}], 1):
        loss.update(metrics, epoch), top1.update(metrics, epoch)
    save_training_state(tmp_path, model=model, optimizer=optimizer, scaler=None, ema=None, epoch=2, step=4,
                        config={}, best=[loss, top1])
    state = load_training_state(tmp_path, model=model, optimizer=optimizer, scaler=None, ema=None)
    assert state.best == {"val_loss": (0.9, 1), "val_top1": (60.0, 2)}


def test_best_model_file_holds_weights_and_config_and_loads_as_a_checkpoint(tmp_path):
    from timm.utils import ModelEmaV3

    model = timm_model(seed=7)
    path = save_model_weights(tmp_path / "best_model.pt", model=model, ema=ModelEmaV3(model),
                              config={"model": "convnextv2_atto", "lr": 1e-3}, epoch=4)
    saved = read_model_weights(path)
    assert saved["config"] == {"model": "convnextv2_atto", "lr": 1e-3} and saved["epoch"] == 4
    assert set(saved["model_ema"]) == set(saved["model"])
    target = timm_model(seed=8)
    load_pretrained_weights(target, path)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in model.state_dict().items())
