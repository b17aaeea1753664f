"""The imagefolder eval transform comes from the model's timm pretrained_cfg (squash for the _384 tags)."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from trainers.config import FinetuneConfig
from trainers.data import build_datasets, eval_data_config


def striped_imagefolder(root, size=(96, 48)):
    """One wide image per split: white left edge (first eighth), black elsewhere."""
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            img = Image.new("RGB", size, (0, 0, 0))
            img.paste((255, 255, 255), (0, 0, size[0] // 8, size[1]))
            img.save(root / split / name / "0.png")
    return root


def val_image(cfg: FinetuneConfig) -> torch.Tensor:
    _, val = build_datasets(cfg)
    return val[0][0]


def folder_cfg(root, **kw) -> FinetuneConfig:
    return FinetuneConfig(dataset="imagefolder", data_root=str(root), num_classes=2, **kw)


def test_384_tag_squashes_the_image_like_convnextv2_and_timm(tmp_path):
    root = striped_imagefolder(tmp_path)
    cfg = folder_cfg(root, model="convnextv2_tiny.fcmae_ft_in22k_in1k_384", input_size=384)
    assert eval_data_config(cfg)["crop_mode"] == "squash" and eval_data_config(cfg)["crop_pct"] == 1.0
    image = val_image(cfg)
    assert image.shape == (3, 384, 384)
    # squash keeps the whole width: the white left eighth is still there; a center crop would cut it off
    assert image[:, :, :8].mean() > 1.5 and image[:, :, 96:].mean() < -1.5


def test_224_tags_resize_and_center_crop(tmp_path):
    root = striped_imagefolder(tmp_path)
    cfg = folder_cfg(root, model="convnextv2_atto.fcmae_ft_in1k", input_size=64)
    assert eval_data_config(cfg)["crop_mode"] == "center" and eval_data_config(cfg)["crop_pct"] == 0.875
    assert val_image(cfg)[:, :, :8].mean() < -1.5  # the white edge is cropped away


def test_config_overrides_the_pretrained_cfg(tmp_path):
    root = striped_imagefolder(tmp_path)
    cfg = folder_cfg(root, model="convnextv2_tiny.fcmae_ft_in22k_in1k_384", input_size=384, crop_mode="center",
                     crop_pct=0.9)
    data_cfg = eval_data_config(cfg)
    assert (data_cfg["crop_mode"], data_cfg["crop_pct"]) == ("center", 0.9)
    assert val_image(cfg)[:, :, :8].mean() < -1.5


def test_384_tag_at_another_input_size_warns():
    cfg = FinetuneConfig(model="convnextv2_tiny.fcmae_ft_in22k_in1k_384", input_size=224)
    with pytest.warns(UserWarning, match="input_size: convnextv2_tiny.fcmae_ft_in22k_in1k_384 was trained .* at "
                                         "384 px but runs at 224 px"):
        eval_data_config(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eval_data_config(cfg.with_overrides({"input_size": 384}))
        eval_data_config(FinetuneConfig(model="convnextv2_tiny.fcmae_ft_in1k", input_size=64))
