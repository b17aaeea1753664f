"""`FinetuneConfig`: every setting of one ConvNeXtV2 finetune, typed, defaulted and validated once.

The defaults finetune `convnextv2_atto` from random init on scikit-learn's digits at 32 px in a few
minutes on 2 CPUs. Sweeps override fields by name (`with_overrides`), so field names are a contract
(docs/architecture.md). This module imports neither torch nor timm at import time: the service
validates sweep specs against `FinetuneConfig.model_fields` without them; model and optimizer names
are checked against the static lists of `trainers/names.py` (kept equal to timm's by a test), the
auto-augment string against timm where timm is installed (always on the workers).
"""

from __future__ import annotations

import contextlib
import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

#: Validation context key: skip the checks that need timm (a Ray Train trial's driver validates its config
#: without importing timm; the workers, which import it anyway, check everything).
TORCH_FREE = "torch_free"
DATASET_CLASSES = {"digits": 10}  # datasets whose class count is fixed
DIGITS_TRAIN_IMAGES = 1437  # the fixed, stratified 80/20 split of scikit-learn's 1797 digits (trainers/data.py)
# metrics a finetune reports every epoch that may pick its best model (`best_metric`)
BEST_METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "ema_val_top1", "ema_val_top5", "ema_val_loss")


class FinetuneConfig(BaseModel):
    """One finetune. Epoch-based fields (warmup_epochs, milestones, step_size) convert to updates."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # --- model ---------------------------------------------------------------------------------
    model: str = Field("convnextv2_atto", description="timm ConvNeXtV2 name, optionally with a pretrained tag "
                       "(convnextv2_tiny.fcmae_ft_in1k)")
    num_classes: int = Field(10, ge=2, description="classes of the dataset (head size)")
    input_size: int = Field(32, ge=32, le=1024, description="square input resolution in pixels")
    pretrained: bool = Field(False, description="load timm hub weights for `model` (needs the hub or its cache)")
    checkpoint: str | None = Field(None, description="local checkpoint to start from: timm, ConvNeXt-V2 "
                                   "finetuned or FCMAE pretraining format")
    head_init_scale: float = Field(0.001, gt=0, description="scales the freshly initialised head (ConvNeXt-V2 "
                                   "finetune default)")
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth rate")

    # --- data ----------------------------------------------------------------------------------
    dataset: Literal["digits", "imagefolder", "synthetic"] = "digits"
    data_root: str | None = Field(None, description="imagefolder root with train/ and val/ class folders")
    synthetic_samples: int = Field(1024, ge=1, description="train samples of the synthetic dataset")
    skip_bad_images: bool = Field(False, description="imagefolder: skip unreadable images (a warning names each) "
                                  "instead of refusing to start")
    loader_workers: int | None = Field(None, ge=0, description="DataLoader processes per worker; None: 0 for "
                                       "in-memory datasets, CPUs per worker - 1 for imagefolder")
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    crop_pct: float | None = Field(None, gt=0, le=1, description="eval center-crop fraction (timm default)")
    aa: str | None = Field("rand-m9-mstd0.5-inc1", description="timm auto-augment string (imagefolder only); "
                           "null disables")
    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability (imagefolder only)")
    color_jitter: float | None = Field(None, ge=0, description="color jitter (imagefolder only)")
    reprob: float = Field(0.25, ge=0, le=1, description="random erasing probability (imagefolder only)")
    remode: Literal["pixel", "rand", "const"] = "pixel"
    recount: int = Field(1, ge=1)

    # --- schedule --------------------------------------------------------------------------------
    epochs: int = Field(5, ge=1, le=100_000)
    steps_per_epoch_limit: int | None = Field(None, ge=1, description="cap on optimizer updates per epoch "
                                              "(tests, benchmarks)")
    batch_size: int = Field(64, ge=1, description="per worker, per micro-batch")
    accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer update")
    blr: float = Field(8e-3, gt=0, description="base LR per 256 images: lr = blr * effective batch / 256")
    lr: float | None = Field(None, gt=0, description="absolute LR; overrides blr")
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    warmup_steps: int | None = Field(None, ge=0, description="warmup in updates; overrides warmup_epochs")
    warmup_mode: Literal["linear", "constant"] = Field("linear", description="linear ramp from "
                                                       "warmup_start_factor, or constant at it")
    warmup_start_factor: float = Field(0.0, ge=0, le=1, description="warmup starts at base_lr * this")
    schedule: str = Field("cosine", description="one of trainers.schedules.SCHEDULE_NAMES")
    milestones: list[float] = Field(default_factory=list, description="multistep milestones in epochs")
    gamma: float = Field(0.1, gt=0, le=1, description="decay factor of step/multistep")
    step_size: float | None = Field(None, gt=0, description="step schedule period in epochs")
    cycles: int = Field(1, ge=1, description="cosine_restarts cycles")
    power: float = Field(1.0, gt=0, description="poly schedule power")

    # --- optimizer -------------------------------------------------------------------------------
    optimizer: str = Field("adamw", description="timm optimizer name (lookahead_ prefix allowed)")
    opt_eps: float | None = Field(1e-8, gt=0)
    opt_betas: tuple[float, float] | None = None
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    weight_decay_end: float | None = Field(None, ge=0, description="cosine-scheduled wd end value; None: constant")
    layer_decay: float = Field(1.0, gt=0, le=1, description="layer-wise LR decay rate; 1.0 disables it")
    layer_decay_type: Literal["single", "group"] = "single"
    no_weight_decay: list[str] = Field(default_factory=list, description="extra parameter names without wd")
    clip_grad: float | None = Field(None, gt=0, description="max global grad norm; None: no clipping")

    # --- regularisation --------------------------------------------------------------------------
    smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing")
    mixup: float = Field(0.0, ge=0, description="mixup alpha; > 0 enables mixup")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha; > 0 enables cutmix")
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    model_ema: bool = False
    model_ema_decay: float = Field(0.9999, gt=0, lt=1)
    model_ema_eval: bool = Field(False, description="also evaluate the EMA model each epoch")

    # --- checkpoints, best model, EMA warm-up, eval crop ---------------------------------------------
    checkpoint_every: int = Field(1, ge=1, description="epochs between training-state checkpoints (the last "
                                  "epoch always checkpoints); a resume repeats at most this many epochs")
    best_metric: str = Field("val_top1", description="reported metric that picks the best model (and "
                             "best_model_path): " + ", ".join(BEST_METRICS))
    best_mode: Literal["max", "min"] = Field("max", description="max: higher best_metric is better; min: lower")
    model_ema_warmup: bool = Field(False, description="timm's EMA warm-up (decay ramps up from 0); false: the "
                                   "fixed model_ema_decay from the first update, as ConvNeXt-V2")
    crop_mode: Literal["center", "squash", "border"] | None = Field(None, description="eval crop; None: the "
                                                                    "model's timm pretrained_cfg (squash for _384 tags)")

    @field_validator("best_metric")
    @classmethod
    def _known_best_metric(cls, value: str) -> str:
        if value not in BEST_METRICS:
            raise ValueError(f"unknown metric {value!r}; choose one of {', '.join(BEST_METRICS)}")
        return value

    @model_validator(mode="after")
    def _best_metric_is_reported(self) -> FinetuneConfig:
        if self.best_metric.startswith("ema_") and not (self.model_ema and self.model_ema_eval):
            raise ValueError(f"best_metric: {self.best_metric} needs model_ema=true and model_ema_eval=true")
        return self

    # --- execution -------------------------------------------------------------------------------
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="auto: bf16 on GPU, off on CPU")
    channels_last: bool | Literal["auto"] = Field("auto", description="auto: on for GPU")
    compile: bool = Field(False, description="torch.compile the model")
    seed: int = Field(0, ge=0)

    # --- validators ------------------------------------------------------------------------------
    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from trainers.names import check_model_name

        return check_model_name(value)

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        from trainers.names import check_optimizer_name

        return check_optimizer_name(value)

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        from trainers.schedules import SCHEDULE_NAMES  # torch-free

        if value not in SCHEDULE_NAMES:
            raise ValueError(f"unknown schedule {value!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
        return value

    @field_validator("aa")
    @classmethod
    def _known_auto_augment(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value in (None, "", "none"):
            return None
        if (info.context or {}).get(TORCH_FREE):  # the workers check it again, with timm
            return value
        try:
            from timm.data import auto_augment as taa
        except ImportError:
            return value
        parse = (taa.rand_augment_transform if value.startswith("rand") else
                 taa.augment_and_mix_transform if value.startswith("augmix") else taa.auto_augment_transform)
        try:
            parse(value, {"translate_const": 100, "img_mean": (124, 116, 104)})
        except Exception as exc:  # noqa: BLE001 - timm raises AssertionError/KeyError on bad strings
            raise ValueError(f"not a timm auto-augment string: {value!r} ({type(exc).__name__} {exc}); e.g. "
                             "'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2', 'v0'") from None
        return value

    @field_validator("milestones")
    @classmethod
    def _sorted_milestones(cls, value: list[float]) -> list[float]:
        if any(m <= 0 for m in value) or value != sorted(value):
            raise ValueError("must be increasing positive epochs, e.g. [30, 60, 90]")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        fixed = DATASET_CLASSES.get(self.dataset)
        if fixed is not None and self.num_classes != fixed:
            raise ValueError(f"num_classes: the {self.dataset} dataset has {fixed} classes, got {self.num_classes}")
        if self.dataset == "imagefolder" and not self.data_root:
            raise ValueError("data_root: required when dataset is imagefolder (a folder with train/ and val/)")
        if self.warmup_steps is None and self.warmup_epochs >= self.epochs > 0 and self.warmup_epochs > 0:
            raise ValueError(f"warmup_epochs: must be below epochs ({self.epochs}), got {self.warmup_epochs}; "
                             f"set warmup_epochs={self.epochs / 5:g} (a fifth of the run) or warmup_epochs=0")
        if self.warmup_steps and self.steps_per_epoch_limit:
            most = self.epochs * self.steps_per_epoch_limit  # an epoch has at most steps_per_epoch_limit updates
            if self.warmup_steps >= most:
                raise ValueError(f"warmup_steps: {self.warmup_steps} updates asked, but the run has at most {most} "
                                 f"({self.epochs} epochs x steps_per_epoch_limit {self.steps_per_epoch_limit}); "
                                 f"set warmup_steps below {most}")
        if self.schedule == "multistep":
            if not self.milestones:
                raise ValueError("milestones: schedule 'multistep' needs milestones in epochs, e.g. [30, 60]")
            if self.milestones[-1] >= self.epochs:
                raise ValueError(f"milestones: must lie below epochs ({self.epochs}), got {self.milestones}")
        if self.schedule == "step" and self.step_size is None:
            raise ValueError("step_size: schedule 'step' needs step_size (epochs between decays), e.g. step_size=30")
        if self.min_lr > 0:
            self._check_min_lr()
        if self.uses_mixup and self.batch_size % 2:
            raise ValueError(f"batch_size: mixup/cutmix mixes pairs of images, so the batch must be even; got "
                             f"{self.batch_size}: set batch_size={self.batch_size + 1} (or {self.batch_size - 1})")
        return self

    def _check_min_lr(self) -> None:
        """The schedules floor at min_lr, so the peak LR must not be below it (resolved LR grows with workers,
        so one worker is the binding case)."""
        if self.lr is not None:
            if self.lr < self.min_lr:
                raise ValueError(f"min_lr: {self.min_lr:g} is above lr {self.lr:g}; set min_lr below lr "
                                 f"(e.g. min_lr={self.lr / 1000:g}) or raise lr")
            return
        one_worker = self.blr * self.batch_size * self.accum_steps / 256  # resolve_lr, without importing torch
        if one_worker < self.min_lr:
            raise ValueError(f"min_lr: {self.min_lr:g} is above the lr that blr gives on one worker "
                             f"({self.blr:g} x {self.batch_size * self.accum_steps} / 256 = {one_worker:g}); "
                             f"set min_lr below it (e.g. min_lr={one_worker / 1000:g}) or raise blr")

    # --- derived values --------------------------------------------------------------------------
    def effective_batch(self, world_size: int) -> int:
        return self.batch_size * self.accum_steps * world_size

    def resolved_lr(self, world_size: int) -> float:
        from trainers.optim import resolve_lr

        return resolve_lr(blr=self.blr, batch_size=self.batch_size, accum_steps=self.accum_steps,
                          world_size=world_size, lr=self.lr)

    def schedule_kwargs(self, *, updates_per_epoch: int, world_size: int) -> dict[str, Any]:
        """Arguments of `build_lr_schedule`: epochs become optimizer updates.

        Raises a ValueError naming the field when a length does not fit this many updates per epoch
        (warmup not shorter than the run, milestones that round onto update 0 or onto each other).
        """
        total = self.epochs * updates_per_epoch
        if self.warmup_steps is not None:
            warmup, asked = self.warmup_steps, f"warmup_steps: {self.warmup_steps} updates"
        else:
            warmup = round(self.warmup_epochs * updates_per_epoch)
            asked = f"warmup_epochs: {self.warmup_epochs:g} epochs ({warmup} updates)"
        if warmup >= total and warmup > 0:
            raise ValueError(f"{asked} is not shorter than the run ({self.epochs} epochs x {updates_per_epoch} "
                             f"updates per epoch = {total} updates); set warmup_steps below {total} or "
                             f"warmup_epochs below {self.epochs}")
        milestones = tuple(round(m * updates_per_epoch) for m in self.milestones)
        if self.schedule == "multistep" and (milestones[:1] == (0,) or len(set(milestones)) < len(milestones)):
            raise ValueError(f"milestones: {self.milestones} epochs are updates {list(milestones)} at "
                             f"{updates_per_epoch} updates per epoch; milestones must be at least one update "
                             f"({1 / updates_per_epoch:g} epochs) after the start and apart, "
                             f"e.g. {[round((i + 1) / updates_per_epoch, 6) for i in range(len(milestones))]}")
        return {
            "name": self.schedule,
            "base_lr": self.resolved_lr(world_size),
            "total_steps": total,
            "warmup_steps": warmup,
            "warmup_mode": self.warmup_mode,
            "warmup_start_factor": self.warmup_start_factor,
            "min_lr": self.min_lr,
            "milestones": milestones,
            "gamma": self.gamma,
            "step_size": None if self.step_size is None else max(1, round(self.step_size * updates_per_epoch)),
            "cycles": self.cycles,
            "power": self.power,
        }

    def updates_per_epoch(self, train_images: int, world_size: int) -> int:
        """Optimizer updates per epoch: whole accumulation windows of each worker's (drop_last) shard, capped by
        `steps_per_epoch_limit`; 0 when the batch does not fit the training set."""
        updates = (train_images // world_size) // self.batch_size // self.accum_steps
        return min(updates, self.steps_per_epoch_limit) if self.steps_per_epoch_limit and updates else updates

    def known_train_images(self) -> int | None:
        """The training-set size where it is known without reading data (digits, synthetic), else None."""
        return {"digits": DIGITS_TRAIN_IMAGES, "synthetic": self.synthetic_samples}.get(self.dataset)

    def check_schedule(self, *, world_size: int) -> None:
        """Where the training set's size is known without reading data (digits, synthetic): raise a ValueError
        naming the field when the batch does not fit it or the LR schedule cannot be built at the run's updates
        per epoch (milestones that round together, a warmup as long as the run). Torch-free, so sweep specs are
        checked with it; `trainers.data.check_data` does the same for every dataset before training."""
        images = self.known_train_images()
        if images is None:
            return
        updates = self.updates_per_epoch(images, world_size)
        if updates == 0:
            raise ValueError(f"batch_size: {self.batch_size} x accum_steps {self.accum_steps} x {world_size} "
                             f"worker(s) is larger than the {images} training images; lower batch_size or "
                             "accum_steps")
        from trainers.schedules import build_lr_schedule  # torch-free

        build_lr_schedule(**self.schedule_kwargs(updates_per_epoch=updates, world_size=world_size))

    def wd_schedule_kwargs(self, *, updates_per_epoch: int) -> dict[str, Any]:
        """Arguments of `build_wd_schedule`."""
        return {"weight_decay": self.weight_decay, "weight_decay_end": self.weight_decay_end,
                "total_steps": self.epochs * updates_per_epoch}

    @property
    def uses_mixup(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    # --- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_file(cls, path: str | Path) -> FinetuneConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def validate_torch_free(cls, data: dict[str, Any]) -> FinetuneConfig:
        """Every check but the ones that import timm (see `TORCH_FREE`)."""
        return cls.model_validate(data, context={TORCH_FREE: True})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        check_field_names(data)
        return cls.model_validate(data)

    def with_overrides(self, overrides: dict[str, Any]) -> FinetuneConfig:
        """A new config with `overrides` applied by field name (validated as a whole)."""
        check_field_names(overrides)
        return type(self).model_validate({**self.model_dump(), **overrides})


# Fields a resumed run must share with the run that wrote the checkpoint: they shape the model, the
# parameter groups (and so the optimizer state), the data each update sees, or the LR / wd schedule.
RESUME_FIELDS = (
    "model", "num_classes", "input_size", "drop_path", "dataset", "data_root", "synthetic_samples",
    "skip_bad_images", "epochs", "steps_per_epoch_limit", "batch_size", "accum_steps", "blr", "lr", "min_lr",
    "warmup_epochs", "warmup_steps", "warmup_mode", "warmup_start_factor", "schedule", "milestones", "gamma",
    "step_size", "cycles", "power", "optimizer", "opt_eps", "opt_betas", "momentum", "weight_decay",
    "weight_decay_end", "layer_decay", "layer_decay_type", "no_weight_decay", "model_ema", "model_ema_decay",
    "model_ema_warmup",
    "seed",
)


def check_resume_config(saved: dict[str, Any] | None, current: FinetuneConfig, where: str = "the checkpoint") -> None:
    """Refuse to resume when `saved` (the config stored with the checkpoint) differs from `current` in a field
    of `RESUME_FIELDS`; the message lists every difference. Fields the saved config lacks (written by an
    older version) are not compared."""
    if not saved:
        return
    now = current.to_dict()
    diffs = [f"{name}: {saved[name]!r} in {where}, {now[name]!r} now" for name in RESUME_FIELDS
             if name in saved and _canonical(saved[name]) != _canonical(now[name])]
    if diffs:
        raise ValueError("cannot resume: these settings differ from the run that wrote " + where + " (a reused "
                         "run name?):\n  " + "\n  ".join(diffs) + "\nuse the same settings to resume, or "
                         "another run name (or storage path) to start a new run")


def _canonical(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def check_field_names(data: dict[str, Any]) -> None:
    """Raise a ValueError naming unknown fields and their closest valid names."""
    fields = list(FinetuneConfig.model_fields)
    unknown = [k for k in data if k not in FinetuneConfig.model_fields]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hints.append(f"{key}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise ValueError(f"unknown finetune setting(s): {', '.join(hints)}")


def format_validation_error(exc: ValidationError | ValueError) -> str:
    """One `field: reason` line per error, for CLI and API messages."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:  # model-level checks already start with the field name
            lines.append(msg)
        elif "got " in msg:
            lines.append(f"{loc}: {msg}")
        else:
            lines.append(f"{loc}: {msg} (got {err.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[str, Any]:
    """`field=value` from the command line; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ValueError(f"--set expects field=value, got {text!r}")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"{key}: NaN is not a valid value")
    return key.strip(), value
