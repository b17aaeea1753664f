"""Datasets and (sharded) loaders for the finetune.

A registry maps `FinetuneConfig.dataset` to a builder returning `(train, val)` datasets:

* `imagefolder`: `root/train/<class>/*` and `root/val/<class>/*` (ConvNeXt-V2's `build_dataset`), timm train
  transforms (RandomResizedCrop, flip, RandAugment, random erasing) and the model's timm eval transform
  (`eval_data_config`: resize + center crop, or squash for the _384 / _512 tags).
  `check_data` opens every image's header before training starts (the CLI and the sweep driver call it
  before Ray Train): unreadable images are an error listing every one, or, with `skip_bad_images`, are
  left out with a warning naming each (a silently shrinking dataset hides bugs).
* `digits`: scikit-learn's 8x8 handwritten digits as RGB, upsampled to `input_size`, with a fixed
  stratified 80/20 split (seed 0, independent of the training seed). Deterministic preprocessing only:
  random crops and flips destroy 8x8 digits, so the per-image augmentations are imagefolder-only.
* `synthetic`: random images from a small fixed pool, for throughput measurements.

Mixup/cutmix are batch-level and apply to every dataset (trainers/loop.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from trainers.config import FinetuneConfig

log = logging.getLogger(__name__)
PROGRESS_FROM = 2000  # image checks of this many files or more show a progress bar
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset problem; the message names the path and the fix."""


def _normalize(x: torch.Tensor) -> torch.Tensor:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (x - mean) / std


class DigitsDataset(Dataset):
    """8x8 grey digits -> normalised RGB tensors at `size` px (resized per item, so memory stays small)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int, interpolation: str):
        self.images, self.labels = images, labels  # images: (N, 1, 8, 8) in [0, 1]
        self.size, self.mode = size, interpolation
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = F.interpolate(self.images[i : i + 1], size=(self.size, self.size), mode=self.mode,
                            **({} if self.mode == "nearest" else {"align_corners": False}))
        img = img[0].clamp_(0, 1).expand(3, -1, -1)
        return _normalize(img), int(self.labels[i])


DIGITS_CACHE = "digits-v1.npz"


def cache_dir() -> Path:
    """Where convtune keeps small derived files: $CONVTUNE_CACHE_DIR, else ~/.cache/convtune."""
    return Path(os.environ.get("CONVTUNE_CACHE_DIR") or Path.home() / ".cache" / "convtune").expanduser()


def digits_arrays() -> dict[str, np.ndarray]:
    """scikit-learn's digits (images 0-16, targets) and the fixed stratified 80/20 split.

    Read from a small cache file after the first call: importing scikit-learn costs ~2 s in every fresh Ray
    Train worker, the arrays 120 kB. The cache is written atomically; a broken one is rebuilt."""
    path = cache_dir() / DIGITS_CACHE
    with contextlib.suppress(OSError, ValueError, KeyError), np.load(path) as cached:
        return {k: cached[k] for k in ("images", "target", "train_idx", "val_idx")}
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_idx, val_idx = train_test_split(np.arange(len(digits.target)), test_size=0.2, random_state=0,
                                          stratify=digits.target)
    arrays = {"images": digits.images.astype(np.uint8), "target": digits.target.astype(np.int64),
              "train_idx": np.asarray(train_idx), "val_idx": np.asarray(val_idx)}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    return arrays


def build_digits(cfg: FinetuneConfig):
    digits = digits_arrays()
    images = torch.tensor(digits["images"], dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits["target"], dtype=torch.long)
    make = lambda idx: DigitsDataset(images[idx], labels[idx], cfg.input_size, cfg.interpolation)  # noqa: E731
    return make(torch.as_tensor(digits["train_idx"])), make(torch.as_tensor(digits["val_idx"]))


class SyntheticDataset(Dataset):
    """`length` samples drawn from a pool of 64 fixed random images: generating data costs nothing."""

    def __init__(self, length: int, size: int, num_classes: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(64, 3, size, size, generator=gen)
        self.labels = torch.randint(0, num_classes, (length,), generator=gen)
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.pool[i % len(self.pool)], int(self.labels[i])


def build_synthetic(cfg: FinetuneConfig):
    val_len = max(cfg.synthetic_samples // 8, 1)
    return (SyntheticDataset(cfg.synthetic_samples, cfg.input_size, cfg.num_classes, seed=1),
            SyntheticDataset(val_len, cfg.input_size, cfg.num_classes, seed=2))


def check_imagefolder(root: str | Path, num_classes: int) -> list[str]:
    """Validate the layout before any worker starts; returns the class names."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data_root: {root} does not exist or is not a folder (expected train/ and val/ inside)")
    classes_per_split = {}
    for split in ("train", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"data_root: missing split folder {split_dir} (expected {root}/train/<class>/... and "
                            f"{root}/val/<class>/...)")
        classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
        if not classes:
            raise DataError(f"data_root: {split_dir} has no class folders")
        for name in classes:
            if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in (split_dir / name).iterdir()):
                raise DataError(f"data_root: class folder {split_dir / name} has no images "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
        classes_per_split[split] = classes
    train, val = classes_per_split["train"], classes_per_split["val"]
    if train != val:
        diff = sorted(set(train) ^ set(val))
        raise DataError(f"data_root: train/ and val/ have different class folders in {root}: {', '.join(diff[:10])}")
    if len(train) != num_classes:
        raise DataError(f"num_classes: is {num_classes} but {root}/train has {len(train)} class folders; "
                        f"set num_classes={len(train)}")
    return train


def _load_rgb(path: str):
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as exc:  # PIL raises many types; all of them mean the file is unusable
        raise DataError(f"unreadable image {path}: {exc}. Remove or replace the file.") from exc


def image_files(split_dir: Path) -> list[Path]:
    """The files `ImageFolder` loads from `split_dir/<class>/`, in its order."""
    return sorted(f for d in sorted(split_dir.iterdir()) if d.is_dir()
                  for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def unreadable_images(files: list[Path], *, what: str = "images") -> list[tuple[Path, str]]:
    """`(path, reason)` for every file PIL cannot identify from its header (a fast pass: no pixel decoding).

    A progress bar on stderr shows the pass over large folders.
    """
    from PIL import Image
    from tqdm import tqdm

    bad = []
    for path in tqdm(files, desc=f"checking {what}", unit="img", file=sys.stderr, mininterval=2.0,
                     disable=len(files) < PROGRESS_FROM):
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 - the header was parsed
        except Exception as exc:  # noqa: BLE001 - PIL raises many types; all of them mean the file is unusable
            bad.append((path, f"{type(exc).__name__}: {exc}"))
    return bad


@dataclass
class ImageCheck:
    """What `check_images` found: images per split (readable ones) and the unreadable files."""

    counts: dict[str, int]
    bad: list[tuple[Path, str]]


def check_images(root: str | Path, *, skip_bad: bool = False) -> ImageCheck:
    """Open the header of every image under `root/train` and `root/val`.

    Unreadable files raise one DataError listing every one of them, unless `skip_bad`: then each is
    named in a warning and left out of the counts (and, in `build_imagefolder`, of the datasets).
    """
    root = Path(root).expanduser()
    counts, bad = {}, []
    started = time.monotonic()
    for split in ("train", "val"):
        files = image_files(root / split)
        split_bad = unreadable_images(files, what=f"{split}/ images")
        counts[split] = len(files) - len(split_bad)
        bad += split_bad
    log.info("checked %d images under %s in %.1f s", sum(counts.values()) + len(bad), root,
             time.monotonic() - started)
    if bad and not skip_bad:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in bad)
        raise DataError(f"data_root: {len(bad)} unreadable image(s) under {root}:\n{lines}\nremove or replace "
                        "them, or set skip_bad_images: true to train without them")
    for path, reason in bad:
        log.warning("skipping unreadable image %s (%s)", path, reason)
    for split, n in counts.items():
        if n == 0:
            raise DataError(f"data_root: no readable images in {root / split}")
    return ImageCheck(counts, bad)


def check_data(cfg: FinetuneConfig, *, world_size: int = 1) -> int:
    """Everything about the data that can fail, checked before Ray Train starts (CLI, sweep driver):
    the imagefolder layout and every image's header, the batch against the dataset size, and the LR
    schedule at the resulting updates per epoch (milestones that round together, a warmup as long as
    the run). Raises DataError with one clear message; returns the updates per epoch."""
    from trainers.schedules import build_lr_schedule

    if cfg.dataset == "imagefolder":
        check_imagefolder(cfg.data_root, cfg.num_classes)
        train_images = check_images(cfg.data_root, skip_bad=cfg.skip_bad_images).counts["train"]
    elif cfg.dataset == "synthetic":
        train_images = cfg.synthetic_samples  # without building the image pool
    else:
        train_images = len(build_datasets(cfg)[0])
    updates = updates_per_epoch(cfg, train_images, world_size)
    try:
        build_lr_schedule(**cfg.schedule_kwargs(updates_per_epoch=updates, world_size=world_size))
    except ValueError as exc:
        raise DataError(f"{exc} ({train_images} training images, {world_size} worker(s))") from None
    return updates


def eval_data_config(cfg: FinetuneConfig) -> dict:
    """timm's eval data config of `cfg.model` (`resolve_data_config` over its pretrained_cfg: crop_pct,
    crop_mode, mean/std) at `cfg.input_size`; `crop_pct`, `crop_mode` and `interpolation` set in the config
    take precedence. The _384 / _512 tags squash the image to the square (ConvNeXt-V2 and timm at >= 384 px);
    the others resize and center-crop 224/256."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    pretrained = get_pretrained_cfg(cfg.model)
    native = re.search(r"_(\d{3,})$", cfg.model.partition(".")[2])
    if native and int(native.group(1)) != cfg.input_size:
        warnings.warn(f"input_size: {cfg.model} was trained and evaluated at {native.group(1)} px but runs at "
                      f"{cfg.input_size} px; set input_size={native.group(1)} or use a tag without "
                      f"_{native.group(1)}", UserWarning, stacklevel=2)
    overrides = {"input_size": (3, cfg.input_size, cfg.input_size), "interpolation": cfg.interpolation,
                 "crop_pct": cfg.crop_pct, "crop_mode": cfg.crop_mode}
    return resolve_data_config(args={k: v for k, v in overrides.items() if v is not None},
                               pretrained_cfg=pretrained.to_dict() if pretrained else None)


def build_imagefolder(cfg: FinetuneConfig):
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    check_imagefolder(cfg.data_root, cfg.num_classes)
    root = Path(cfg.data_root).expanduser()
    valid = None
    if cfg.skip_bad_images:  # every worker finds the same files, so the shards stay consistent
        skipped = {str(path) for path, _ in check_images(root, skip_bad=True).bad}
        valid = lambda path: path.lower().endswith(IMAGE_EXTENSIONS) and path not in skipped  # noqa: E731
    train_tf = create_transform(cfg.input_size, is_training=True, hflip=cfg.hflip, color_jitter=cfg.color_jitter,
                                auto_augment=cfg.aa, interpolation=cfg.interpolation, re_prob=cfg.reprob,
                                re_mode=cfg.remode, re_count=cfg.recount)
    eval_cfg = eval_data_config(cfg)
    eval_tf = create_transform(cfg.input_size, is_training=False, interpolation=eval_cfg["interpolation"],
                               crop_pct=eval_cfg["crop_pct"], crop_mode=eval_cfg["crop_mode"],
                               mean=eval_cfg["mean"], std=eval_cfg["std"])
    return (ImageFolder(str(root / "train"), transform=train_tf, loader=_load_rgb, is_valid_file=valid),
            ImageFolder(str(root / "val"), transform=eval_tf, loader=_load_rgb, is_valid_file=valid))


DATASETS: dict[str, Callable[[FinetuneConfig], tuple[Dataset, Dataset]]] = {
    "digits": build_digits,
    "imagefolder": build_imagefolder,
    "synthetic": build_synthetic,
}
IN_MEMORY = {"digits", "synthetic"}


def build_datasets(cfg: FinetuneConfig) -> tuple[Dataset, Dataset]:
    return DATASETS[cfg.dataset](cfg)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    train_sampler: DistributedSampler
    micro_batches_per_epoch: int  # per worker, whole accumulation windows only
    updates_per_epoch: int

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Call before each epoch: the sampler's order and the loader workers' RNGs (augmentations) follow
        from (epoch, seed) alone, so a resumed run draws the same batches as an uninterrupted one."""
        self.train_sampler.set_epoch(epoch)
        self.train.generator.manual_seed(seed)  # the worker processes, started per epoch, seed from it


def updates_per_epoch(cfg: FinetuneConfig, train_images: int, world_size: int) -> int:
    """Optimizer updates per epoch: whole accumulation windows of each worker's (drop_last) shard."""
    updates = cfg.updates_per_epoch(train_images, world_size)
    if updates == 0:
        raise DataError(f"batch_size: {cfg.batch_size} x accum_steps {cfg.accum_steps} x {world_size} worker(s) "
                        f"is larger than the {train_images} training images; lower batch_size or accum_steps")
    return updates


def loader_workers(cfg: FinetuneConfig, cpus_per_worker: int) -> int:
    if cfg.loader_workers is not None:
        return cfg.loader_workers
    return 0 if cfg.dataset in IN_MEMORY else max(cpus_per_worker - 1, 1)


def build_loaders(cfg: FinetuneConfig, *, rank: int = 0, world_size: int = 1, cpus_per_worker: int = 1,
                  pin_memory: bool = False) -> Loaders:
    """Train batches sharded by a seeded DistributedSampler (`set_epoch` makes the order a function of the
    epoch, which keeps resume exact); val split into disjoint, unpadded shards so the metrics, summed over
    workers, count every image once."""
    train_ds, val_ds = build_datasets(cfg)
    sampler = DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    updates = updates_per_epoch(cfg, len(train_ds), world_size)
    workers = loader_workers(cfg, cpus_per_worker)
    # train workers are started per epoch (not persistent): a persistent worker would keep its RNG stream
    # across epochs, and a resumed run's fresh worker could not reproduce it
    train = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                       pin_memory=pin_memory, persistent_workers=False, generator=torch.Generator())
    val_shard = Subset(val_ds, range(rank, len(val_ds), world_size))
    val = DataLoader(val_shard, batch_size=max(int(1.5 * cfg.batch_size), 1), shuffle=False, num_workers=workers,
                     pin_memory=pin_memory, persistent_workers=workers > 0)  # eval transforms are not random
    return Loaders(train, val, sampler, updates * cfg.accum_steps, updates)
