"""The finetune loop: the one function Ray Train runs on every worker (it also runs in a plain process).

Semantics follow ConvNeXt-V2's `engine_finetune.train_one_epoch` (optim_semantics.md §1.5-1.6): at the
start of every accumulation window the pure schedule sets every group's LR (x lr_scale) and weight decay
for update `step`; the loss is divided by `accum_steps`; the optimizer steps at the window's end,
followed by the EMA update. Trailing micro-batches that cannot fill a window are not drawn (ConvNeXt-V2
back-propagates and then discards them; the parameters are the same). Resume is exact: the training
state holds model, optimizer, scaler, EMA, epoch and update step, and every RNG is re-seeded from
(seed, epoch, rank) at the start of each epoch, so no RNG state needs saving.

`config` holds `"finetune"` (a `FinetuneConfig` dict) and optionally `"mlflow"` (see
trainers/mlflow_logging.py), `"cpus_per_worker"` (torch threads), `"progress_queue"` (a
`ray.util.queue.Queue` for live progress) and, outside Ray, `"resume_from"` (a checkpoint directory).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainers.checkpoints import load_training_state, save_model_weights, save_training_state, saved_config
from trainers.config import FinetuneConfig, check_resume_config
from trainers.data import build_loaders
from trainers.layer_decay import unwrap_model
from trainers.models import build_model
from trainers.optim import create_optimizer
from trainers.param_groups import build_param_groups
from trainers.schedules import apply_schedule, build_lr_schedule, build_wd_schedule

log = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any], str | None], None]
PROGRESS_EVERY_S = 1.0


# ---- where we run ------------------------------------------------------------------------------

@dataclass
class WorkerEnv:
    rank: int
    world_size: int
    device: torch.device
    in_ray: bool
    checkpoint_dir: contextlib.AbstractContextManager | None  # Ray's restore checkpoint, if any

    @classmethod
    def detect(cls) -> WorkerEnv:
        try:
            import ray.train

            ctx = ray.train.get_context()
        except (ImportError, RuntimeError, DeprecationWarning):  # a plain process, or a Tune trial process
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            return cls(0, 1, device, False, None)
        import ray.train.torch

        ckpt = ray.train.get_checkpoint()
        return cls(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), True,
                   ckpt.as_directory() if ckpt else None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return seed * 1_000_003 + epoch * 1_009 + rank


# ---- precision, loss, EMA ------------------------------------------------------------------------

def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def build_criterion(cfg: FinetuneConfig):
    """(mixup_fn or None, train loss) as ConvNeXt-V2: soft targets with mixup, else label smoothing / CE."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.uses_mixup:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                      prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                      label_smoothing=cfg.smoothing, num_classes=cfg.num_classes)
        return mixup, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, torch.nn.CrossEntropyLoss()


# ---- one epoch -----------------------------------------------------------------------------------

@dataclass
class TrainParts:
    """What one epoch needs; built once by `train_loop_per_worker`."""

    cfg: FinetuneConfig
    model: torch.nn.Module  # what forward runs on (DDP / compiled wrapper)
    optimizer: torch.optim.Optimizer
    lr_schedule: Any
    wd_schedule: Any
    criterion: Any
    mixup: Any
    scaler: torch.amp.GradScaler | None
    ema: Any
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    world_size: int
    progress: Callable[[dict[str, Any]], None] = field(default=lambda _: None)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def to_device(self, images, targets):
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return images, targets.to(self.device, non_blocking=True)


def train_one_epoch(p: TrainParts, loader, micro_batches: int, epoch: int, step: int) -> tuple[dict, int]:
    """Train `micro_batches` micro-batches; returns (stats, global update step after the epoch)."""
    cfg, accum = p.cfg, p.cfg.accum_steps
    p.model.train()
    p.optimizer.zero_grad(set_to_none=True)
    loss_sum, seen, last_progress, lr = 0.0, 0, time.monotonic(), 0.0
    start = time.perf_counter()
    for micro, (images, targets) in enumerate(loader):
        if micro >= micro_batches:
            break
        if micro % accum == 0:  # schedule: the LR of update `step`, constant over the window
            lr = p.lr_schedule.lr_at(step)
            apply_schedule(p.optimizer, lr, p.wd_schedule.wd_at(step))
        images, targets = p.to_device(images, targets)
        if p.mixup is not None:
            images, targets = p.mixup(images, targets)

        with p.autocast():  # forward
            loss = p.criterion(p.model(images), targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at epoch {epoch}, update {step}: lower lr/blr, "
                                     "enable clip_grad, or use amp=bf16 instead of fp16")

        is_update = (micro + 1) % accum == 0
        sync = contextlib.nullcontext() if is_update or p.world_size == 1 else p.model.no_sync()
        with sync:  # backward (gradients all-reduced only on the window's last micro-batch)
            scaled = loss / accum
            (p.scaler.scale(scaled) if p.scaler else scaled).backward()

        if is_update:  # step
            if p.scaler:
                p.scaler.unscale_(p.optimizer)
            if cfg.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(p.model.parameters(), cfg.clip_grad)
            if p.scaler:
                p.scaler.step(p.optimizer)
                p.scaler.update()
            else:
                p.optimizer.step()
            p.optimizer.zero_grad(set_to_none=True)
            step += 1
            if p.ema is not None:  # EMA
                p.ema.update(unwrap_model(p.model), step=step)

        loss_sum += loss_value
        seen += images.shape[0]
        if time.monotonic() - last_progress > PROGRESS_EVERY_S:
            last_progress = time.monotonic()
            p.progress({"kind": "step", "epoch": epoch, "micro": micro + 1, "of": micro_batches,
                        "loss": loss_value, "lr": lr})
    if p.device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    lrs = [g["lr"] for g in p.optimizer.param_groups]
    stats = torch.tensor([loss_sum, micro_batches, seen], dtype=torch.float64, device=p.device)
    if p.world_size > 1:
        dist.all_reduce(stats)
    return {
        "train_loss": stats[0].item() / max(stats[1].item(), 1),
        "images_per_s": stats[2].item() / train_s,
        "train_s": train_s,
        "lr": lr, "lr_min": min(lrs), "lr_max": max(lrs),
        "weight_decay": max(g["weight_decay"] for g in p.optimizer.param_groups),
    }, step


@torch.no_grad()
def evaluate(model, loader, p: TrainParts) -> dict[str, float]:
    """Top-1 / top-5 (percent) and loss over this worker's val shard, summed over all workers."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=p.device)  # loss, top1, top5, n
    for images, targets in loader:
        images, targets = p.to_device(images, targets)
        with p.autocast():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(targets[:, None])
        sums += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                             torch.tensor(float(len(targets)), dtype=torch.float64, device=p.device)])
    if p.world_size > 1:
        dist.all_reduce(sums)
    n = max(sums[3].item(), 1.0)
    return {"loss": sums[0].item() / n, "top1": 100.0 * sums[1].item() / n, "top5": 100.0 * sums[2].item() / n}


# ---- the worker function -------------------------------------------------------------------------

def train_loop_per_worker(config: dict[str, Any], *, reporter: Reporter | None = None) -> None:
    """Finetune `config["finetune"]` on this worker; report metrics (+ a checkpoint from rank 0) per epoch.

    In Ray Train, reports go to `ray.train.report`; in a plain process to `reporter(metrics, ckpt_dir)`
    (the directory is deleted after the call returns; see `LocalReporter`).
    """
    cfg = FinetuneConfig.model_validate(config["finetune"])
    env = WorkerEnv.detect()
    if config.get("cpus_per_worker"):
        torch.set_num_threads(int(config["cpus_per_worker"]))
    seed_everything(cfg.seed)  # same initial weights on every rank
    if env.rank == 0:
        log.info("finetune %s on %s, %d worker(s)", cfg.model, env.device, env.world_size)

    # data, model, optimizer, schedules
    loaders = build_loaders(cfg, rank=env.rank, world_size=env.world_size,
                            cpus_per_worker=int(config.get("cpus_per_worker") or 1),
                            pin_memory=env.device.type == "cuda")
    model, _ = build_model(cfg)
    channels_last = cfg.channels_last if isinstance(cfg.channels_last, bool) else env.device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(env.device, memory_format=memory_format)
    groups = build_param_groups(model, model_name=cfg.model, layer_decay=cfg.layer_decay,
                                layer_decay_type=cfg.layer_decay_type, weight_decay=cfg.weight_decay,
                                no_weight_decay=cfg.no_weight_decay)
    optimizer = create_optimizer(cfg.optimizer, groups, lr=cfg.resolved_lr(env.world_size), momentum=cfg.momentum,
                                 betas=cfg.opt_betas, eps=cfg.opt_eps)
    lr_schedule = build_lr_schedule(**cfg.schedule_kwargs(updates_per_epoch=loaders.updates_per_epoch,
                                                          world_size=env.world_size))
    wd_schedule = build_wd_schedule(**cfg.wd_schedule_kwargs(updates_per_epoch=loaders.updates_per_epoch))
    amp_dtype = autocast_dtype(cfg.amp, env.device)
    scaler = torch.amp.GradScaler(env.device.type) if amp_dtype == torch.float16 else None
    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.model_ema_decay)

    # resume
    start_epoch, step, best_top1, best_epoch, mlflow_run_id = 0, 0, -1.0, 0, None
    resume_ctx = env.checkpoint_dir or (contextlib.nullcontext(config["resume_from"])
                                        if config.get("resume_from") else None)
    if resume_ctx is not None:
        with resume_ctx as ckpt_dir:
            check_resume_config(saved_config(ckpt_dir), cfg)  # a reused run name must not change the run
            state = load_training_state(ckpt_dir, model=model, optimizer=optimizer, scaler=scaler, ema=ema)
            mlflow_run_id = _read_run_id(ckpt_dir)
        start_epoch, step, best_top1, best_epoch = state.epoch, state.step, state.best_val_top1, state.best_epoch
        log.info("resumed at epoch %d, update %d", start_epoch, step)

    train_model = model
    if env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda"
                                              else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    mixup, criterion = build_criterion(cfg)
    parts = TrainParts(cfg, train_model, optimizer, lr_schedule, wd_schedule, criterion, mixup, scaler, ema,
                       env.device, amp_dtype, memory_format, env.world_size,
                       progress=_progress_sink(config.get("progress_queue")) if env.rank == 0 else (lambda _: None))

    mlflow = _start_mlflow(config, cfg, env, groups, lr_schedule, loaders.updates_per_epoch, mlflow_run_id)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            epoch_start = time.perf_counter()
            seed_everything(epoch_seed(cfg.seed, epoch, env.rank))
            loaders.train_sampler.set_epoch(epoch)
            stats, step = train_one_epoch(parts, loaders.train, loaders.micro_batches_per_epoch, epoch, step)
            val = evaluate(model, loaders.val, parts)
            metrics = {"epoch": epoch + 1, "step": step, **stats,
                       "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]}
            if ema is not None and cfg.model_ema_eval:
                ema_val = evaluate(ema.module, loaders.val, parts)
                metrics.update(ema_val_top1=ema_val["top1"], ema_val_top5=ema_val["top5"],
                               ema_val_loss=ema_val["loss"])
            improved = metrics["val_top1"] > best_top1
            if improved:
                best_top1, best_epoch = metrics["val_top1"], epoch + 1
            metrics.update(best_val_top1=best_top1, best_epoch=best_epoch,
                           epoch_s=time.perf_counter() - epoch_start)
            last = epoch + 1 == cfg.epochs
            if mlflow is not None:  # before the report: code after the last report may never run
                mlflow.log_metrics(metrics, step=epoch + 1)
                if improved:
                    _log_best(mlflow, model, ema, cfg)
                if last:
                    mlflow.finish("FINISHED")
            save = functools.partial(_save_checkpoint, model=model, optimizer=optimizer, scaler=scaler, ema=ema,
                                     epoch=epoch + 1, step=step, cfg=cfg, best=best_top1, best_epoch=best_epoch,
                                     mlflow=mlflow)
            _report(env, reporter, metrics, save)
    except BaseException:
        if mlflow is not None:
            mlflow.finish("FAILED")
        raise


RUN_ID_FILE = "mlflow_run_id.txt"


def _read_run_id(ckpt_dir) -> str | None:
    path = Path(ckpt_dir) / RUN_ID_FILE
    return path.read_text().strip() if path.is_file() else None


def _save_checkpoint(directory, *, model, optimizer, scaler, ema, epoch, step, cfg, best, best_epoch, mlflow):
    save_training_state(directory, model=model, optimizer=optimizer, scaler=scaler, ema=ema, epoch=epoch,
                        step=step, config=cfg.to_dict(), best_val_top1=best, best_epoch=best_epoch)
    if mlflow is not None and mlflow.owns_run:  # a retried worker keeps logging into the same run
        (Path(directory) / RUN_ID_FILE).write_text(mlflow.run_id)


def _report(env: WorkerEnv, reporter: Reporter | None, metrics: dict, save: Callable[[str], None]) -> None:
    """Every rank reports (it is a barrier in Ray Train); only rank 0 attaches a checkpoint."""
    with tempfile.TemporaryDirectory(prefix="convtune-ckpt-") as tmp:
        if env.rank == 0:
            save(tmp)
        if env.in_ray:
            import ray.train

            ckpt = ray.train.Checkpoint.from_directory(tmp) if env.rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)
        elif reporter is not None:
            reporter(metrics, tmp if env.rank == 0 else None)


def _start_mlflow(config, cfg, env, groups, lr_schedule, updates_per_epoch, resumed_run_id):
    settings = config.get("mlflow")
    if env.rank != 0 or not settings:
        return None
    from trainers.mlflow_logging import RunLogger

    logger = RunLogger({**settings, "run_id": settings.get("run_id") or resumed_run_id})
    if resumed_run_id and not settings.get("run_id"):
        logger.owns_run = True  # our own run, reopened after a retry
    derived = {"world_size": env.world_size, "effective_batch": cfg.effective_batch(env.world_size),
               "resolved_lr": lr_schedule.base_lr, "updates_per_epoch": updates_per_epoch,
               "total_updates": lr_schedule.total_steps, "warmup_updates": lr_schedule.warmup_steps,
               "device": str(env.device)}
    logger.log_setup(params={**cfg.to_dict(), **derived}, groups=groups, schedule=lr_schedule,
                     model_name=cfg.model)
    return logger


def _log_best(mlflow, model, ema, cfg: FinetuneConfig) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model_weights(Path(tmp) / "model.pt", model=model, ema=ema, config=cfg.to_dict())
        mlflow.log_artifact(path, "best_checkpoint")


def _progress_sink(queue) -> Callable[[dict[str, Any]], None]:
    if queue is None:
        return lambda _: None

    def put(item: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # progress is best effort: a full queue drops the update
            queue.put_nowait(item)

    return put


class LocalReporter:
    """Collects metrics and copies rank 0's checkpoints to `root/epoch_XXXX` (plain-process runs)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else None
        self.history: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.history.append(dict(metrics))
        if self.root is not None and checkpoint_dir is not None:
            target = self.root / f"epoch_{metrics['epoch']:04d}"
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
            self.checkpoints.append(target)
