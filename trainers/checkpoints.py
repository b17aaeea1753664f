"""Checkpoints: loading weights to finetune from, and saving / restoring the full training state.

Loading (`load_pretrained_weights`) accepts three layouts and converts them to timm names:

* timm state dicts (what `timm.create_model(...).state_dict()` and our best checkpoints hold),
* ConvNeXt-V2's finetuned checkpoints (`downsample_layers.*`, `stages.s.b.dwconv.*`, mapped with timm's
  own `checkpoint_filter_fn`),
* ConvNeXt-V2 FCMAE pretraining checkpoints: decoder / mask token / projection / prediction keys are
  dropped and the sparse (MinkowskiEngine) encoder names and kernels become dense ones
  (optim_semantics.md §1.7), then mapped as above.

A head whose shape differs from the model's (other class count) is dropped, so the model keeps its own
freshly initialised head (trunc-normal std .02 x head_init_scale = ConvNeXt-V2's re-init for 0.001).
A checkpoint of another architecture raises `CheckpointMismatchError`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainers.layer_decay import unwrap_model

log = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.pt"
FCMAE_DROP = ("decoder", "mask_token", "proj", "pred")
HEAD_PREFIX = "head.fc."


class CheckpointMismatchError(ValueError):
    """The checkpoint's weights do not fit the model."""


@dataclass
class LoadReport:
    path: str
    layout: str  # timm | convnextv2 | fcmae
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # removed on purpose (decoder keys, mismatched head)

    def summary(self) -> str:
        return (f"loaded {self.layout} checkpoint {self.path}: {len(self.missing)} missing "
                f"({', '.join(self.missing[:6])}{'...' if len(self.missing) > 6 else ''}), "
                f"{len(self.unexpected)} unexpected ({', '.join(self.unexpected[:6])}), "
                f"{len(self.dropped)} dropped ({', '.join(self.dropped[:6])}{'...' if len(self.dropped) > 6 else ''})")


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # ConvNeXt-V2 checkpoints carry their argparse namespace; allow exactly that beside tensors
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def extract_state_dict(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_ema", "module"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith("encoder.") or k.endswith(".kernel") or k == "mask_token" for k in keys):
        return "fcmae"
    if any(k.startswith("downsample_layers.") or ".dwconv." in k or ".pwconv1." in k for k in keys):
        return "convnextv2"
    return "timm"


def _dense_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """Minkowski kernel -> dense conv weight: kernel index k = x * ks + y."""
    ks = math.isqrt(kernel.shape[0])
    if kernel.dim() == 3:  # (kv, in, out) -> (out, in, ks, ks)
        return kernel.reshape(ks, ks, *kernel.shape[1:]).permute(3, 2, 1, 0).contiguous()
    return kernel.reshape(ks, ks, kernel.shape[1]).permute(2, 1, 0).unsqueeze(1).contiguous()  # depthwise


def fcmae_to_convnextv2(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """FCMAE encoder keys -> dense ConvNeXt-V2 keys; returns (state, dropped keys)."""
    out, dropped = {}, []
    for key, value in state.items():
        if any(s in key for s in FCMAE_DROP):
            dropped.append(key)
            continue
        if key.startswith("encoder."):
            key = key.split(".", 1)[1]
        if key.endswith("kernel"):
            key, value = key.rsplit(".", 1)[0] + ".weight", _dense_kernel(value)
        elif "ln" in key or "linear" in key:
            parts = key.split(".")
            key = ".".join(parts[:-2] + parts[-1:])
        if key.endswith("bias") and value.dim() != 1:
            value = value.reshape(-1)
        if "grn" in key:
            value = value.reshape(1, 1, 1, -1)
        out[key] = value
    return out, dropped


def to_timm_layout(state: dict[str, torch.Tensor], model: nn.Module, layout: str, path: str):
    from timm.models.convnext import checkpoint_filter_fn

    dropped: list[str] = []
    if layout == "fcmae":
        state, dropped = fcmae_to_convnextv2(state)
    if layout in ("fcmae", "convnextv2"):
        try:
            state = checkpoint_filter_fn(state, model)
        except (KeyError, RuntimeError) as exc:
            raise CheckpointMismatchError(f"checkpoint {path} ({layout} layout) does not fit "
                                          f"{type(model).__name__}: {exc}") from exc
    return state, dropped


def load_pretrained_weights(model: nn.Module, path: str | Path, *, model_name: str = "") -> LoadReport:
    """Load `path` into `model` (non-strict), reporting missing, unexpected and dropped keys."""
    model = unwrap_model(model)
    state = extract_state_dict(read_checkpoint_file(path))
    layout = detect_layout(state)
    state, dropped = to_timm_layout(state, model, layout, str(path))
    own = model.state_dict()
    for key in [k for k in state if k.startswith(HEAD_PREFIX) and k in own and state[k].shape != own[k].shape]:
        dropped.append(key)  # other class count: keep the model's fresh head
        del state[key]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    body = [k for k in own if not k.startswith("head.")]
    matched = sum(k in state for k in body)
    if mismatched or matched < 0.5 * len(body):
        detail = "; ".join(mismatched[:3]) or f"only {matched} of {len(body)} backbone tensors found"
        raise CheckpointMismatchError(f"checkpoint {path} does not match model {model_name or type(model).__name__}:"
                                      f" {detail}. Is it a checkpoint of another ConvNeXtV2 variant?")
    result = model.load_state_dict(state, strict=False)
    report = LoadReport(str(path), layout, list(result.missing_keys), list(result.unexpected_keys), dropped)
    log.info(report.summary())
    return report


# ---- the training state (resume) -----------------------------------------------------------------

@dataclass
class Best:
    """The best value so far of one reported metric, and the 1-based epoch that reached it."""

    metric: str
    mode: str = "max"  # max | min
    value: float | None = None
    epoch: int = 0

    def update(self, metrics: dict[str, Any], epoch: int) -> bool:
        """Take `metrics[self.metric]` of `epoch` if it beats the best so far; returns whether it did."""
        value = metrics[self.metric]
        if not math.isfinite(value):
            return False
        if self.value is not None and not (value > self.value if self.mode == "max" else value < self.value):
            return False
        self.value, self.epoch = float(value), epoch
        return True


@dataclass
class TrainState:
    epoch: int  # finished epochs
    step: int  # optimizer updates done
    best: dict[str, tuple[float, int]]  # metric -> (best value, its epoch)


def save_training_state(directory: str | Path, *, model, optimizer, scaler, ema, epoch: int, step: int,
                        config: dict, best: list[Best]) -> Path:
    """Everything needed to continue exactly: RNGs are re-derived from (seed, epoch, rank) instead."""
    path = Path(directory) / TRAIN_STATE_FILE
    torch.save({
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "model_ema": ema.state_dict() if ema is not None else None,
        "epoch": epoch, "step": step, "config": config,
        "best": {b.metric: [b.value, b.epoch] for b in best if b.value is not None},
    }, path)
    return path


def load_training_state(directory: str | Path, *, model, optimizer, scaler, ema) -> TrainState:
    path = Path(directory) / TRAIN_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {TRAIN_STATE_FILE} in checkpoint {directory}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if ema is not None and state["model_ema"] is not None:
        ema.load_state_dict(state["model_ema"])
    best = state.get("best")
    if best is None:  # written before best_metric existed: it tracked val_top1 only
        best = {"val_top1": [state["best_val_top1"], state["best_epoch"]]} if state["best_val_top1"] >= 0 else {}
    return TrainState(state["epoch"], state["step"], {k: (float(v), int(e)) for k, (v, e) in best.items()})


def save_model_weights(path: str | Path, *, model, ema=None, config: dict | None = None,
                       **info: Any) -> Path:
    """A finetune result in timm layout, no optimizer state: `{"model", "model_ema" (or None), "config"
    (the FinetuneConfig as a JSON string), **info}`; `checkpoint=<path>` loads it back."""
    path = Path(path)
    torch.save({"model": unwrap_model(model).state_dict(),
                "model_ema": unwrap_model(ema.module).state_dict() if ema is not None else None,
                "config": json.dumps(config) if config is not None else None, **info}, path)
    return path


def read_model_weights(path: str | Path) -> dict[str, Any]:
    """What `save_model_weights` wrote, with `config` parsed back into a dict."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(saved.get("config"), str):
        saved["config"] = json.loads(saved["config"])
    return saved
