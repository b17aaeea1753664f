"""Datasets and sharded loaders: digits, synthetic, imagefolder, and every bad-data error."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainers import data
from trainers.config import FinetuneConfig
from trainers.data import (
    DataError,
    build_datasets,
    build_loaders,
    check_data,
    check_imagefolder,
    check_images,
)


def make_imagefolder(root, classes=("cat", "dog", "fox"), per_class=4, size=40):
    for split in ("train", "val"):
        for i, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                color = (40 * i, 20 * j, 200 - 30 * i)
                Image.new("RGB", (size, size + 8 * j), color).save(folder / f"{j}.png")
    return root


def test_digits_split_is_fixed_stratified_rgb():
    cfg = FinetuneConfig(input_size=32)
    train, val = build_datasets(cfg)
    assert (len(train), len(val)) == (1437, 360)
    assert FinetuneConfig().known_train_images() == len(train)  # the torch-free count sweep specs are checked with
    image, label = train[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    raw = image * torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) + torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    again, _ = build_datasets(cfg.with_overrides({"seed": 123}))  # the split does not follow the train seed
    assert torch.equal(again[5][0], train[5][0])
    assert sorted(set(val.labels.tolist())) == list(range(10))


def test_synthetic_dataset_has_requested_shape():
    train, val = build_datasets(FinetuneConfig(dataset="synthetic", num_classes=7, input_size=48,
                                               synthetic_samples=100))
    assert len(train) == 100 and len(val) == 12
    image, label = train[99]
    assert image.shape == (3, 48, 48) and 0 <= label < 7


def test_loaders_shard_train_and_val_across_workers():
    cfg = FinetuneConfig(batch_size=16, accum_steps=2)
    shards = [build_loaders(cfg, rank=r, world_size=2) for r in range(2)]
    for s in shards:
        s.train_sampler.set_epoch(3)
    train_idx = [set(iter(s.train_sampler)) for s in shards]
    assert not train_idx[0] & train_idx[1]
    val_idx = [set(s.val.dataset.indices) for s in shards]
    assert not val_idx[0] & val_idx[1] and len(val_idx[0] | val_idx[1]) == 360
    # 1437 images / 2 workers -> 718 per worker -> 44 micro-batches -> 22 updates of 2
    assert shards[0].updates_per_epoch == 22 and shards[0].micro_batches_per_epoch == 44
    capped = build_loaders(cfg.with_overrides({"steps_per_epoch_limit": 3}))
    assert capped.updates_per_epoch == 3 and capped.micro_batches_per_epoch == 6


def test_batch_larger_than_dataset_is_an_error():
    with pytest.raises(DataError, match="batch_size"):
        build_loaders(FinetuneConfig(dataset="synthetic", synthetic_samples=10, batch_size=16))


def test_imagefolder_loads_with_timm_transforms(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    cfg = FinetuneConfig(dataset="imagefolder", data_root=str(root), num_classes=3, input_size=32)
    train, val = build_datasets(cfg)
    assert train.classes == ["cat", "dog", "fox"] and len(train) == 12
    assert train[0][0].shape == (3, 32, 32) and val[5][0].shape == (3, 32, 32)


@pytest.mark.parametrize(("breakage", "message"), [
    ("no_root", "does not exist"),
    ("no_val", "missing split folder"),
    ("empty_class", "has no images"),
    ("class_mismatch", "different class folders"),
    ("wrong_count", "num_classes: is 4 but"),
])
def test_imagefolder_errors_name_the_path(tmp_path, breakage, message):
    root = make_imagefolder(tmp_path / "data")
    num_classes = 3
    if breakage == "no_root":
        root = tmp_path / "nowhere"
    elif breakage == "no_val":
        for f in (root / "val").rglob("*.png"):
            f.unlink()
        for d in sorted((root / "val").rglob("*"), reverse=True):
            d.rmdir()
        (root / "val").rmdir()
    elif breakage == "empty_class":
        for f in (root / "train" / "dog").iterdir():
            f.unlink()
    elif breakage == "class_mismatch":
        (root / "val" / "fox").rename(root / "val" / "wolf")
    elif breakage == "wrong_count":
        num_classes = 4
    with pytest.raises(DataError, match=message) as info:
        check_imagefolder(root, num_classes)
    assert str(root) in str(info.value)


def test_corrupt_image_is_fatal_and_named(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(b"not a png at all")
    cfg = FinetuneConfig(dataset="imagefolder", data_root=str(root), num_classes=3, input_size=32)
    train, _ = build_datasets(cfg)
    index = train.samples.index((str(bad), 1))
    with pytest.raises(DataError, match=f"unreadable image {bad}"):
        train[index]


def break_images(root):
    bad = [root / "train" / "dog" / "1.png", root / "val" / "fox" / "3.png"]
    bad[0].write_bytes(b"not a png at all")
    bad[1].write_bytes(b"")
    return bad


def test_check_data_lists_every_unreadable_image_before_training(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    bad = break_images(root)
    cfg = FinetuneConfig(dataset="imagefolder", data_root=str(root), num_classes=3, input_size=32, batch_size=4)
    with pytest.raises(DataError) as info:
        check_data(cfg)
    message = str(info.value)
    assert message.startswith(f"data_root: 2 unreadable image(s) under {root}:")
    for path in bad:
        assert f"\n  {path}: UnidentifiedImageError" in message
    assert "skip_bad_images: true" in message


def test_skip_bad_images_leaves_them_out_with_a_warning_naming_each(tmp_path, caplog):
    root = make_imagefolder(tmp_path / "data")
    bad = break_images(root)
    cfg = FinetuneConfig(dataset="imagefolder", data_root=str(root), num_classes=3, input_size=32, batch_size=4,
                         skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="trainers.data"):
        assert check_data(cfg) == 11 // 4  # 11 readable training images, batch 4
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"skipping unreadable image {p}" for p in bad]
    train, val = build_datasets(cfg)
    assert (len(train), len(val)) == (11, 11)
    assert str(bad[0]) not in [path for path, _ in train.samples]
    assert all(train.loader(path).size for path, _ in train.samples + val.samples)  # every kept file loads


def test_image_check_shows_progress_on_large_folders(tmp_path, monkeypatch, capsys):
    root = make_imagefolder(tmp_path / "data")
    monkeypatch.setattr(data, "PROGRESS_FROM", 5)  # the threshold, not the check: 12 images count as large
    check_images(root)
    assert "checking train/ images" in capsys.readouterr().err


@pytest.mark.parametrize(("values", "message"), [
    ({"schedule": "multistep", "milestones": [0.2, 0.4], "batch_size": 1000},
     "milestones: [0.2, 0.4] epochs are updates [0, 0] at 1 updates per epoch"),  # 1437 images // 1000: 1 update per epoch
    ({"batch_size": 2000}, "batch_size: 2000 x accum_steps 1 x 1 worker(s) is larger than the 1437 training"),
])
def test_check_data_finds_schedule_and_batch_problems_before_training(values, message):
    with pytest.raises(DataError) as info:
        check_data(FinetuneConfig(**values))
    assert message in str(info.value)


def test_convtune_train_reports_unreadable_images_as_one_message(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    bad = break_images(root)
    done = subprocess.run([sys.executable, "-m", "service.cli", "train", "--set", "dataset=imagefolder",
                           "--set", f"data_root={root}", "--set", "num_classes=3", "--no-mlflow"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2, done.stderr
    assert "2 unreadable image(s)" in done.stderr and all(str(p) in done.stderr for p in bad)
    assert "Traceback" not in done.stderr and "Ray" not in done.stderr


def test_sweep_driver_checks_the_data_before_starting_anything(tmp_path):
    """`run_sweep` (the Ray job's entrypoint and `convtune sweep`) runs check_data first: no Ray, no MLflow run."""
    from search_spaces.driver import run_sweep
    from search_spaces.spec import load_spec

    root = make_imagefolder(tmp_path / "data")
    bad = break_images(root)
    spec = load_spec({"name": "bad-data", "base": {"dataset": "imagefolder", "data_root": str(root), "num_classes": 3,
                                                   "batch_size": 4},
                      "space": {"blr": {"type": "choice", "values": [1e-3, 2e-3]}}})
    with pytest.raises(DataError, match=r"2 unreadable image\(s\)") as info:
        run_sweep(spec, sweep_id="bad-data", storage_path=str(tmp_path / "state"),
                  mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert all(str(p) in str(info.value) for p in bad)
    assert not (tmp_path / "state").exists() and not (tmp_path / "mlflow.db").exists()


def test_the_default_augmentation_never_fails_on_the_installed_pillow():
    """timm's RandAugment at our default `aa` (magnitude noise) sometimes posterizes with 0 bits, which
    Pillow 13 refuses: about 5 in 3,000 images, so imagefolder training crashed mid-epoch."""
    import random

    from timm.data import create_transform

    cfg = FinetuneConfig(dataset="imagefolder", data_root="/unused", num_classes=2)
    transform = create_transform(32, is_training=True, auto_augment=cfg.aa, hflip=cfg.hflip,
                                 color_jitter=cfg.color_jitter, re_prob=cfg.reprob)
    image = Image.new("RGB", (40, 40), (120, 80, 40))
    random.seed(0)
    torch.manual_seed(0)
    for _ in range(3000):
        transform(image)


def test_digits_come_from_a_cache_equal_to_scikit_learns_split(tmp_path, monkeypatch):
    """Fresh Ray Train workers read digits without importing scikit-learn (~2 s each)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    monkeypatch.setenv("CONVTUNE_CACHE_DIR", str(tmp_path))
    first = data.digits_arrays()
    assert (tmp_path / data.DIGITS_CACHE).is_file()
    digits = load_digits()
    train_idx, val_idx = train_test_split(np.arange(len(digits.target)), test_size=0.2, random_state=0,
                                          stratify=digits.target)
    assert (first["images"] == digits.images).all() and (first["target"] == digits.target).all()
    assert (first["train_idx"] == train_idx).all() and (first["val_idx"] == val_idx).all()
    code = ("import sys; from trainers.data import digits_arrays; a = digits_arrays(); "
            "assert 'sklearn' not in sys.modules; print(len(a['train_idx']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "CONVTUNE_CACHE_DIR": str(tmp_path)})
    assert out.stdout.strip() == "1437", out.stderr[-2000:]
    (tmp_path / data.DIGITS_CACHE).write_bytes(b"not a zip")  # a broken cache is rebuilt, not trusted
    again = data.digits_arrays()
    assert all((again[k] == first[k]).all() for k in first)
