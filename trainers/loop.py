"""The finetune loop: the one function Ray Train runs on every worker (it also runs in a plain process).

Semantics follow ConvNeXt-V2's `engine_finetune.train_one_epoch` (optim_semantics.md §1.5-1.6): at the
start of every accumulation window the pure schedule sets every group's LR (x lr_scale) and weight decay
for update `step`; the loss is divided by `accum_steps`; the optimizer steps at the window's end,
followed by the EMA update. Trailing micro-batches that cannot fill a window are not drawn (ConvNeXt-V2
back-propagates and then discards them; the parameters are the same). Resume is exact: the training
state (every `checkpoint_every` epochs and after the last) holds model, optimizer, scaler, EMA, epoch and
update step, and every RNG, loader workers' included, is re-seeded from (seed, epoch, rank) at the start
of each epoch, so no RNG state needs saving. When `best_metric` improves, rank 0 writes a small best-model
file into the run's storage (`RunStorage`) and reports its path as `best_model_path`.

`config` holds `"finetune"` (a `FinetuneConfig` dict) and optionally `"mlflow"` (see
trainers/mlflow_logging.py), `"cpus_per_worker"` (torch threads), `"progress_queue"` (a
`ray.util.queue.Queue` for live progress) and, outside Ray, `"resume_from"` (a checkpoint directory) and
`"output_dir"` (where the best model goes, a path or a pyarrow URI; default: a temporary directory removed
when the run ends).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
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

from trainers.checkpoints import (
    Best,
    load_training_state,
    save_model_weights,
    save_training_state,
    saved_config,
)
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
        """Ray Train's rank, world size and device (`ray.train.torch.get_device`: this worker's GPU or the CPU);
        outside Ray a torch.distributed group if one is initialised, else one process."""
        try:
            import ray.train

            ctx = ray.train.get_context()
        except (ImportError, RuntimeError, DeprecationWarning):  # a plain process, or a Tune trial process
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            cuda = torch.cuda.is_available()
            device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
            return cls(rank, world, device, False, None)
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

def configure_cuda(device: torch.device) -> None:
    """On CUDA: cuDNN picks the fastest kernels for the fixed input size (ConvNeXt-V2 sets cudnn.benchmark)
    and fp32 matmuls / convolutions run on TF32 tensor cores. Nothing changes on CPU."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """amp=auto: bf16 on a GPU that has it natively (Ampere and later), else fp16 (with a GradScaler),
    off on CPU. Emulated bf16 (pre-Ampere GPUs) is slower than fp16 and never picked."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def grad_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


def memory_format_for(cfg: FinetuneConfig, device: torch.device) -> torch.memory_format:
    """channels_last=auto: on for GPU (tensor-core convolutions), off on CPU."""
    on = cfg.channels_last if isinstance(cfg.channels_last, bool) else device.type == "cuda"
    return torch.channels_last if on else torch.contiguous_format


def wrap_for_ddp(model: torch.nn.Module, env: WorkerEnv) -> torch.nn.Module:
    """DDP over the workers: Ray Train's `prepare_model` in Ray (NCCL on GPU, gloo on CPU, as TorchTrainer
    set up the group), torch's DDP in a plain torch.distributed group; one worker trains the model itself."""
    if env.world_size == 1:
        return model
    if env.in_ray:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)


def build_ema(cfg: FinetuneConfig, model: torch.nn.Module):
    """timm's ModelEmaV3. Without `model_ema_warmup` the decay is `model_ema_decay` from the first update
    (ConvNeXt-V2); with it, timm's warm-up ramps the decay up from 0 (the first update copies the model)."""
    if not cfg.model_ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)


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

    def gradient_sync(self, is_update: bool):
        """DDP all-reduces gradients only in the backward of a window's last micro-batch: the forward and
        backward of the others run under `no_sync` (the forward too, or DDP syncs anyway)."""
        if is_update or self.world_size == 1:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def to_device(self, images, targets):
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return images, targets.to(self.device, non_blocking=True)


def train_one_epoch(p: TrainParts, loader, micro_batches: int, epoch: int, step: int) -> tuple[dict, int]:
    """Train `micro_batches` micro-batches; returns (stats, global update step after the epoch)."""
    cfg, accum = p.cfg, p.cfg.accum_steps
    second_order = getattr(p.optimizer, "is_second_order", False)  # adahessian differentiates the gradients
    p.model.train()
    p.optimizer.zero_grad(set_to_none=True)
    # losses stay on the device: reading one (.item()) waits for the GPU, so that happens once per update
    loss_sum = torch.zeros((), dtype=torch.float64, device=p.device)
    window_loss = torch.zeros((), dtype=torch.float64, device=p.device)
    seen, last_progress, lr = 0, time.monotonic(), 0.0
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

        is_update = (micro + 1) % accum == 0
        with p.gradient_sync(is_update):
            with p.autocast():  # forward
                loss = p.criterion(p.model(images), targets)
            scaled = loss / accum  # backward
            (p.scaler.scale(scaled) if p.scaler else scaled).backward(create_graph=second_order)
        window_loss += loss.detach()

        if is_update:  # step
            check_finite(window_loss, epoch, step)
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
            if p.ema is not None:  # EMA (step=None: the fixed decay, unless the warm-up is on)
                p.ema.update(unwrap_model(p.model), step=step if cfg.model_ema_warmup else None)
            loss_sum += window_loss
            window_loss.zero_()

        seen += images.shape[0]
        if time.monotonic() - last_progress > PROGRESS_EVERY_S:
            last_progress = time.monotonic()
            p.progress({"kind": "step", "epoch": epoch, "micro": micro + 1, "of": micro_batches,
                        "loss": loss.item(), "lr": lr})
    if p.device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    lrs = [g["lr"] for g in p.optimizer.param_groups]
    stats = torch.stack([loss_sum, torch.tensor(float(micro_batches), dtype=torch.float64, device=p.device),
                         torch.tensor(float(seen), dtype=torch.float64, device=p.device)])
    if p.world_size > 1:
        dist.all_reduce(stats)
    return {
        "train_loss": stats[0].item() / max(stats[1].item(), 1),
        "images_per_s": stats[2].item() / train_s,
        "train_s": train_s,
        "lr": lr, "lr_min": min(lrs), "lr_max": max(lrs),
        "weight_decay": max(g["weight_decay"] for g in p.optimizer.param_groups),
    }, step


def check_finite(window_loss: torch.Tensor, epoch: int, step: int) -> None:
    """Stop on a NaN / inf loss before it reaches the parameters (one device sync per update)."""
    if not torch.isfinite(window_loss).item():
        raise FloatingPointError(f"loss is {window_loss.item()} at epoch {epoch}, update {step}: lower lr/blr, "
                                 "enable clip_grad, or use amp=bf16 instead of fp16")


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
    """Finetune `config["finetune"]` on this worker; report metrics every epoch, with a checkpoint from rank 0
    every `checkpoint_every` epochs and after the last.

    In Ray Train, reports go to `ray.train.report`; in a plain process to `reporter(metrics, ckpt_dir)`
    (the directory is deleted after the call returns; see `LocalReporter`).
    """
    if config.get("mlflow"):  # MLflow's import (seconds) overlaps building the data and model
        _import_in_background("mlflow.tracking")
    cfg = FinetuneConfig.model_validate(config["finetune"])
    env = WorkerEnv.detect()
    if config.get("cpus_per_worker"):
        torch.set_num_threads(int(config["cpus_per_worker"]))
    configure_cuda(env.device)
    seed_everything(cfg.seed)  # same initial weights on every rank
    if env.rank == 0:
        log.info("finetune %s on %s, %d worker(s)", cfg.model, env.device, env.world_size)

    # data, model, optimizer, schedules
    loaders = build_loaders(cfg, rank=env.rank, world_size=env.world_size,
                            cpus_per_worker=int(config.get("cpus_per_worker") or 1),
                            pin_memory=env.device.type == "cuda")
    model, _ = build_model(cfg)
    memory_format = memory_format_for(cfg, env.device)
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
    scaler = grad_scaler(amp_dtype, env.device)
    ema = build_ema(cfg, model)
    best = best_trackers(cfg)  # best[0] picks the best model; the others are reported alongside
    storage = RunStorage.for_run(env, config)

    # resume
    start_epoch, step, mlflow_run_id = 0, 0, None
    resume_ctx = env.checkpoint_dir or (contextlib.nullcontext(config["resume_from"])
                                        if config.get("resume_from") else None)
    if resume_ctx is not None:
        with resume_ctx as ckpt_dir:
            check_resume_config(saved_config(ckpt_dir), cfg)  # a reused run name must not change the run
            state = load_training_state(ckpt_dir, model=model, optimizer=optimizer, scaler=scaler, ema=ema)
            mlflow_run_id = _read_run_id(ckpt_dir)
        start_epoch, step = state.epoch, state.step
        for tracker in best:
            tracker.value, tracker.epoch = state.best.get(tracker.metric, (None, 0))
        log.info("resumed at epoch %d, update %d", start_epoch, step)

    train_model = wrap_for_ddp(model, env)
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
            loaders.set_epoch(epoch, epoch_seed(cfg.seed, epoch, env.rank))
            stats, step = train_one_epoch(parts, loaders.train, loaders.micro_batches_per_epoch, epoch, step)
            val = evaluate(model, loaders.val, parts)
            metrics = {"epoch": epoch + 1, "step": step, **stats,
                       "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]}
            if ema is not None and cfg.model_ema_eval:
                ema_val = evaluate(ema.module, loaders.val, parts)
                metrics.update(ema_val_top1=ema_val["top1"], ema_val_top5=ema_val["top5"],
                               ema_val_loss=ema_val["loss"])
            for tracker in best[1:]:
                tracker.update(metrics, epoch + 1)
            if best[0].update(metrics, epoch + 1) and env.rank == 0:  # best model: weights (+ EMA), config
                storage.save_best_model(model=model, ema=ema, cfg=cfg, epoch=epoch + 1, metric=best[0].metric,
                                        value=best[0].value)
            metrics.update(best_metrics(best, storage), epoch_s=time.perf_counter() - epoch_start)
            last = epoch + 1 == cfg.epochs
            if mlflow is not None:  # before the report: code after the last report may never run
                mlflow.log_metrics(metrics, step=epoch + 1)
                if last and _logs_best_model(config, mlflow):  # once, at the end of training
                    _log_best_model(mlflow, storage)
                if last:
                    mlflow.finish("FINISHED")
            save = None
            if last or (epoch + 1) % cfg.checkpoint_every == 0:
                save = functools.partial(_save_checkpoint, model=model, optimizer=optimizer, scaler=scaler, ema=ema,
                                         epoch=epoch + 1, step=step, cfg=cfg, best=best, mlflow=mlflow)
            _report(env, reporter, metrics, save)
    except BaseException:
        if mlflow is not None:
            mlflow.finish("FAILED")
        raise


# ---- best model ----------------------------------------------------------------------------------

BEST_MODEL_FILE = "best_model.pt"


def best_trackers(cfg: FinetuneConfig) -> list[Best]:
    """`best_metric` first (it picks the best model), then model and EMA top-1 (ConvNeXt-V2 tracks both)."""
    trackers = [Best(cfg.best_metric, cfg.best_mode)]
    extra = ["val_top1"] + (["ema_val_top1"] if cfg.model_ema and cfg.model_ema_eval else [])
    return trackers + [Best(metric, "max") for metric in extra if metric != cfg.best_metric]


def best_metrics(best: list[Best], storage: RunStorage) -> dict[str, Any]:
    """`best_<metric>`, `best_epoch`, `best_model_path` of the tracked metric; `best_<m>`, `best_<m>_epoch`
    of the others."""
    tracked, *others = best
    out = {f"best_{tracked.metric}": tracked.value, "best_epoch": tracked.epoch,
           "best_model_path": storage.path(BEST_MODEL_FILE) if tracked.epoch else None}
    for tracker in others:
        out.update({f"best_{tracker.metric}": tracker.value, f"best_{tracker.metric}_epoch": tracker.epoch})
    return out


class RunStorage:
    """Where rank 0 keeps the best model: Ray Train's run directory (`storage_path/name` on any pyarrow
    filesystem, so shared or cloud storage works), else `config["output_dir"]` (a path or a pyarrow URI such
    as s3://bucket/run), else a temporary directory
    that lives as long as this object (plain-process runs)."""

    def __init__(self, filesystem, directory: str, keep_alive: Any = None):
        self.fs, self.directory, self._keep_alive = filesystem, directory.rstrip("/"), keep_alive

    @classmethod
    def for_run(cls, env: WorkerEnv, config: dict[str, Any]) -> RunStorage:
        from pyarrow import fs as pafs

        if env.in_ray:
            import ray.train

            with contextlib.suppress(NotImplementedError):  # Train's local mode has no storage
                storage = ray.train.get_context().get_storage()
                return cls(storage.storage_filesystem, storage.experiment_fs_path)
        output_dir = config.get("output_dir")
        if output_dir and "://" in output_dir:  # s3://..., gs://...: the run's storage of a sweep trial
            filesystem, path = pafs.FileSystem.from_uri(output_dir)
            return cls(filesystem, path)
        if output_dir:
            return cls(pafs.LocalFileSystem(), str(Path(output_dir).expanduser().resolve()))
        tmp = tempfile.TemporaryDirectory(prefix="convtune-run-")
        return cls(pafs.LocalFileSystem(), tmp.name, keep_alive=tmp)

    def path(self, name: str) -> str:
        """A local path, or `<scheme>://...` on remote storage."""
        from pyarrow import fs as pafs

        full = f"{self.directory}/{name}"
        return full if isinstance(self.fs, pafs.LocalFileSystem) else f"{self.fs.type_name}://{full}"

    def save_best_model(self, *, model, ema, cfg: FinetuneConfig, epoch: int, metric: str, value: float) -> str:
        """Write `best_model.pt` (replacing the previous one only once the new one is complete)."""
        from pyarrow import fs as pafs

        self.fs.create_dir(self.directory, recursive=True)
        target = f"{self.directory}/{BEST_MODEL_FILE}"
        with tempfile.TemporaryDirectory(prefix="convtune-best-") as tmp:
            local = save_model_weights(Path(tmp) / BEST_MODEL_FILE, model=model, ema=ema, config=cfg.to_dict(),
                                       epoch=epoch, metric=metric, value=value)
            pafs.copy_files(str(local), target + ".partial", destination_filesystem=self.fs)
        self.fs.move(target + ".partial", target)
        return self.path(BEST_MODEL_FILE)

    @contextlib.contextmanager
    def local_copy(self, name: str):
        """A local path of `name` for the duration of the block (downloaded from remote storage)."""
        from pyarrow import fs as pafs

        if isinstance(self.fs, pafs.LocalFileSystem):
            yield f"{self.directory}/{name}"
            return
        with tempfile.TemporaryDirectory(prefix="convtune-dl-") as tmp:
            pafs.copy_files(f"{self.directory}/{name}", f"{tmp}/{name}", source_filesystem=self.fs)
            yield f"{tmp}/{name}"


def _logs_best_model(config: dict[str, Any], mlflow) -> bool:
    """A run of its own (`convtune train`, which passes `log_best_model`) logs its best model to MLflow at the
    end; a sweep trial does not (the sweep driver logs and registers the sweep's best)."""
    return mlflow.owns_run or bool((config.get("mlflow") or {}).get("log_best_model"))


def _log_best_model(mlflow, storage: RunStorage) -> None:
    """Upload the best model as the run's `best_checkpoint/model.pt` artifact."""
    with storage.local_copy(BEST_MODEL_FILE) as path, tempfile.TemporaryDirectory() as tmp:
        os.symlink(path, Path(tmp) / "model.pt")  # the artifact's name, without copying a large file
        mlflow.log_artifact(Path(tmp) / "model.pt", "best_checkpoint")


RUN_ID_FILE = "mlflow_run_id.txt"


def _read_run_id(ckpt_dir) -> str | None:
    path = Path(ckpt_dir) / RUN_ID_FILE
    return path.read_text().strip() if path.is_file() else None


def _save_checkpoint(directory, *, model, optimizer, scaler, ema, epoch, step, cfg, best, mlflow):
    save_training_state(directory, model=model, optimizer=optimizer, scaler=scaler, ema=ema, epoch=epoch,
                        step=step, config=cfg.to_dict(), best=best)
    if mlflow is not None and mlflow.owns_run:  # a retried worker keeps logging into the same run
        (Path(directory) / RUN_ID_FILE).write_text(mlflow.run_id)


def _report(env: WorkerEnv, reporter: Reporter | None, metrics: dict,
            save: Callable[[str], None] | None) -> None:
    """Every rank reports (it is a barrier in Ray Train); rank 0 attaches a checkpoint when `save` is given."""
    if env.rank != 0 or save is None:
        _send_report(env, reporter, metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="convtune-ckpt-") as tmp:
        save(tmp)
        _send_report(env, reporter, metrics, tmp)


def _send_report(env: WorkerEnv, reporter: Reporter | None, metrics: dict, ckpt_dir: str | None) -> None:
    if env.in_ray:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)
    elif reporter is not None:
        reporter(metrics, ckpt_dir)


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


def _import_in_background(module: str) -> None:
    """Start importing `module` in a daemon thread; a later import of it waits for that one (import lock)."""
    import importlib
    import sys
    import threading

    def run() -> None:
        with contextlib.suppress(Exception):  # the real import later reports any error
            importlib.import_module(module)

    if module not in sys.modules:
        threading.Thread(target=run, name=f"import-{module}", daemon=True).start()


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
