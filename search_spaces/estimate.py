"""The dry run's compute estimate, from grounded quantities only.

* **Work**: forward FLOPs per image (:data:`MODEL_GFLOPS_224`, counted once with torch's
  ``FlopCounterMode`` on timm's models, scaled by pixels to the input size) x 3 for a training step
  (the backward pass costs about twice the forward) x images per epoch x the epochs a trial is expected
  to train under its scheduler x trials.
* **Time** needs the hardware's measured speed: ``estimate.seconds_per_epoch``, or
  ``estimate.images_per_second`` (one worker), or ``convtune sweep SPEC --dry-run --probe``, which times a
  few real training steps of the spec's model on the machine it runs on. Without one, hours are
  "unknown", with the reason: a FLOP count says nothing about a device's speed on it.
* Per-trial start-up and teardown (:data:`TRIAL_OVERHEAD_S`, measured by benchmarks/bench_sweep.py) is
  added once per trial, with or without early stopping.

Torch-free, so the service image can dry-run specs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainers.config import DIGITS_TRAIN_IMAGES  # torch-free

#: Forward GFLOPs per 224 px image (1,000 classes), from ``torch.utils.flop_counter.FlopCounterMode`` on
#: ``timm.create_model(name)`` (tests/search_spaces/test_estimate.py keeps it equal to timm).
MODEL_GFLOPS_224 = {
    "convnextv2_atto": 1.095,
    "convnextv2_femto": 1.559,
    "convnextv2_pico": 2.734,
    "convnextv2_nano": 4.891,
    "convnextv2_tiny": 8.911,
    "convnextv2_small": 17.367,
    "convnextv2_base": 30.709,
    "convnextv2_large": 68.723,
    "convnextv2_huge": 229.844,
}
#: Training step / forward pass, in FLOPs.
TRAIN_FLOPS_FACTOR = 3.0
#: Per-trial cost beyond training (Ray Train trials / the in_process opt-in), seconds: benchmarks/bench_sweep.py
#: overhead on the 2-core machine (docs/sweeps.md, "Sweep overhead"); a GPU node starts processes faster.
TRIAL_OVERHEAD_S = {"in_process": 5.0, "train": 20.0}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def forward_gflops(model: str, input_size: int) -> float | None:
    """Forward GFLOPs of one image; None for a model outside the table."""
    base = MODEL_GFLOPS_224.get(model.split(".")[0])
    return None if base is None else base * (input_size / 224) ** 2


def images_per_epoch(cfg: Any, workers: int) -> tuple[int | None, str | None]:
    """(training images one epoch of a trial sees, or None, and why not)."""
    if cfg.dataset == "digits":
        images = DIGITS_TRAIN_IMAGES
    elif cfg.dataset == "synthetic":
        images = cfg.synthetic_samples
    else:
        train = Path(cfg.data_root or "").expanduser() / "train"
        if not train.is_dir():
            return None, f"{train} is not readable here (the dry run counts the images of an imagefolder)"
        images = sum(1 for f in train.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if cfg.steps_per_epoch_limit:
        images = min(images, cfg.steps_per_epoch_limit * cfg.batch_size * cfg.accum_steps * workers)
    return images, None


def estimate(spec: Any, cfg: Any, expected_epochs: float, max_epochs: int, trials: int | None,
             concurrency: int, images_per_second: float | None = None) -> dict[str, Any]:
    """The estimate fields of a dry run (see the module docstring for the model)."""
    res = spec.resources
    unit, per_trial_units = ("GPU", res.gpus_per_trial) if res.gpus_per_trial else ("CPU", res.cpus_per_trial)
    overhead_s = TRIAL_OVERHEAD_S["train" if res.uses_train else "in_process"]
    gflops = forward_gflops(cfg.model, cfg.input_size)
    images, why = images_per_epoch(cfg, res.workers_per_trial)
    out: dict[str, Any] = {"gflops_per_image": None if gflops is None else round(gflops, 3),
                           "images_per_epoch": images, "estimate_unit": f"{unit}-hours",
                           "trial_overhead_s": overhead_s, "train_pflops": None, "seconds_per_epoch": None,
                           "estimate_hours": None, "estimate_upper_bound_hours": None, "wall_hours": None}
    if gflops is None:
        why = why or f"no FLOP count for {cfg.model}"
    if images is not None and gflops is not None and trials is not None:
        out["train_pflops"] = float(f"{TRAIN_FLOPS_FACTOR * gflops * images * expected_epochs * trials / 1e6:.4g}")
    epoch_s = spec.estimate.seconds_per_epoch
    speed = spec.estimate.images_per_second or images_per_second
    if epoch_s is None and speed and images is not None:
        epoch_s = images / (speed * res.workers_per_trial)  # DDP workers share the epoch's images
    if epoch_s is None:
        out["note"] = why or ("no measured speed for this hardware: run `convtune sweep SPEC --dry-run --probe` on "
                              "a node like the cluster's, or set estimate.images_per_second")
        return out
    out["seconds_per_epoch"] = round(epoch_s, 3)
    if trials is None:
        out["note"] = "unbounded trials (num_samples -1): only the time budget bounds the sweep"
        return out
    per_trial_h = (expected_epochs * epoch_s + overhead_s) / 3600
    bound_h = (max_epochs * epoch_s + overhead_s) / 3600  # the overhead once per trial, not scaled by epochs
    waves = -(-trials // concurrency)
    out.update(estimate_hours=round(per_trial_h * trials * per_trial_units, 4),
               estimate_upper_bound_hours=round(bound_h * trials * per_trial_units, 4),
               wall_hours=round(per_trial_h * waves, 4), note=None)
    if spec.time_budget_s:
        out["wall_hours"] = min(out["wall_hours"], round(spec.time_budget_s / 3600, 4))
    return out
