"""Running the finetune on Ray Train (V2): `build_torch_trainer` for sweeps and `run_finetune` for
`convtune train`.

A sweep's Tune function trainable calls `build_torch_trainer(..., callbacks=[TuneReportCallback()])`
and `.fit()`; the Train run name must be deterministic so a retried trial resumes from its checkpoint.
`run_finetune` also starts a local Ray (dashboard on: the sweep's placement-group check uses the State
API) when none is running, creates the MLflow run driver-side (so a crash still marks it FAILED), and
streams progress from the workers through a small Ray queue.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from trainers.config import FinetuneConfig

SCORE_ATTR = "val_top1"
WORKER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
#: Ray Train settings a run's driver sets unless the user did (Train passes them on to its controller and
#: workers). The controller polls its workers every health-check interval: Ray's default of 2 s delays each
#: report and the end of a run by up to 2 s; 0.2 s costs one cheap actor call per worker per interval.
TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", **WORKER_ENV}


def default_storage_path() -> str:
    return str(Path(os.environ.get("CONVTUNE_STORAGE_PATH") or Path.home() / ".convtune" / "runs").resolve())


def train_loop_config(cfg: FinetuneConfig | dict[str, Any], *, cpus_per_worker: int,
                      mlflow: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The `train_loop_config` of a finetune: the validated config plus run settings."""
    if isinstance(cfg, dict):
        cfg = FinetuneConfig.from_dict(cfg)
    out: dict[str, Any] = {"finetune": cfg.to_dict(), "cpus_per_worker": cpus_per_worker, **extra}
    if mlflow:
        from trainers.mlflow_logging import absolute_tracking_uri

        out["mlflow"] = {**mlflow, "tracking_uri": absolute_tracking_uri(mlflow.get("tracking_uri"))}
    return out


@functools.cache
def trainer_class():
    """Ray Train's `TorchTrainer` without its per-run `PlacementGroupCleaner`, and without its
    `DatasetManager` when the run has no Ray Datasets (convtune's never has: data is built in the workers).

    Train V2 starts that detached actor beside every run's controller to free the worker placement group
    if the controller dies ungracefully. Here it is redundant and it misbehaves: a placement group made by
    the controller belongs to the job, so Ray frees it when the job's driver exits, and while a sweep
    driver lives its own check (`search_spaces.cleanup`) frees the groups of dead Train workers. And when a
    controller dies while it starts (a cancel, an ASHA stop during start-up), the cleaner can be left
    without its `start_monitoring` call (queued in the dead controller) and stays alive for good, one
    orphan actor per such trial (seen in CI). Without it each run also starts one actor process fewer and
    its shutdown does not wait for the cleaner to stop.

    Train also starts a `DatasetManager` actor per run, to hand out Ray Dataset shards, even when there
    are none: one more fresh process (importing Ray Data, 1.5-2 s of CPU) starting while the worker
    imports torch, on the same cores. Both are filtered out of Train's default callbacks
    (`_create_default_callbacks`, Ray 2.60's hook: `tests/trainers/test_ray_train.py` checks that neither
    actor starts, so a Ray upgrade that renames it fails there rather than silently).
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class ConvtuneTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            dropped = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, dropped)]

    return ConvtuneTorchTrainer


def build_torch_trainer(
    config: dict[str, Any] | FinetuneConfig,
    *,
    name: str,
    storage_path: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1,
    gpus_per_worker: float | None = None,
    callbacks: Sequence[Any] = (),
    max_failures: int = 0,
    controller_failure_limit: int = 3,
    num_to_keep: int = 2,
):
    """A Train V2 `TorchTrainer` running `train_loop_per_worker` (gloo on CPU, NCCL on GPU).

    `config` is a `FinetuneConfig`, its dict, or a full train-loop config (`{"finetune": ..., "mlflow": ...}`,
    see `train_loop_config`). `controller_failure_limit` bounds retries of controller errors such as a worker
    group that cannot start (Ray's default retries forever). The best `num_to_keep` checkpoints by
    the config's `best_metric` are kept under `storage_path/name`; reusing (storage_path, name) resumes the run.
    """
    import ray.train

    from trainers.loop import train_loop_per_worker

    for key, value in TRAIN_ENV_DEFAULTS.items():  # read by fit(), which passes them on to the controller
        os.environ.setdefault(key, value)
    threads = max(1, int(cpus_per_worker))  # a fractional reservation still runs one thread
    if isinstance(config, FinetuneConfig) or "finetune" not in config:
        config = train_loop_config(config, cpus_per_worker=threads)
    else:
        config = {**config, "cpus_per_worker": threads}
    # fail here, not on every worker; without importing timm (seconds per trial), which the workers do
    cfg = FinetuneConfig.validate_torch_free(config["finetune"])
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker or 1
    threads = str(threads)
    return trainer_class()(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=max_failures,
                                                   controller_failure_limit=controller_failure_limit),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep,
                                                         checkpoint_score_attribute=cfg.best_metric,
                                                         checkpoint_score_order=cfg.best_mode),
            worker_runtime_env={"env_vars": {**WORKER_ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}},
        ),
    )


def _progress_callback_class():
    import ray.train

    class ProgressCallback(ray.train.UserCallback):
        """Runs in the Train controller: forwards every epoch report (rank 0's metrics) to a queue."""

        def __init__(self, queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint):
            item = {"kind": "epoch", **metrics[0], "checkpoint_path": checkpoint.path if checkpoint else None}
            with contextlib.suppress(Exception):  # progress must never fail the run
                self.queue.put(item, timeout=10)

    return ProgressCallback


@dataclass
class FinetuneResult:
    name: str
    storage_path: str
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per epoch (rank 0's metrics)
    best_val_top1: float | None = None
    best_epoch: int | None = None
    best_checkpoint: str | None = None
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_id: str | None = None
    dashboard_url: str | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def run_dir(self) -> str:
        return str(Path(self.storage_path) / self.name)


def cluster_env(address: str | None, dashboard_url: str | None = None) -> dict[str, str]:
    """Env vars for every process of this driver's job, so a State API call in any actor finds *this*
    cluster. Ray Train's placement-group cleaner (a detached actor per run) checks its controller through
    the State API; without these it resolves the cluster from /tmp/ray's address file, which on a host with
    another (or an earlier) Ray points elsewhere: each call then waits 10-40 s, every Train run's shutdown
    waits 12 s for the cleaner, and a stopped trial's placement group leaks (docs/sweeps.md)."""
    env = {**WORKER_ENV}
    if address and "://" not in address and address not in ("auto", "local"):
        env["RAY_ADDRESS"] = address  # host:port of the GCS, as Ray Jobs give their drivers
    elif dashboard_url:
        env["RAY_API_SERVER_ADDRESS"] = dashboard_url
    return env


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> tuple[bool, str | None]:
    """Attach to `address` (else $RAY_ADDRESS, as in a Ray job), or start a local Ray with the dashboard
    (Train's placement-group cleaner needs the State API). Returns (started here, dashboard URL)."""
    import socket

    import ray

    if ray.is_initialized():
        return False, None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # inside a Ray job the job's runtime_env is merged with this one (distinct keys)
        ctx = ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": cluster_env(address)})
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster: no token needed
        with socket.socket() as sock:  # the dashboard's port, known before the workers start
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ctx = ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                       num_cpus=num_cpus, log_to_driver=False,
                       runtime_env={"env_vars": cluster_env(None, f"http://127.0.0.1:{port}")})
    url = getattr(ctx, "dashboard_url", None)
    return address is None, (f"http://{url}" if url and "://" not in url else url)


def default_cpus_per_worker(num_workers: int, use_gpu: bool) -> int:
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_worker = max(cpus // max(num_workers, 1), 1)
    return min(per_worker, 8) if use_gpu else per_worker


def run_finetune(
    cfg: FinetuneConfig,
    *,
    num_workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: int | None = None,
    ray_address: str | None = None,
    storage_path: str | None = None,
    name: str | None = None,
    mlflow: dict[str, Any] | None = None,
    max_failures: int = 0,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """One finetune on Ray Train, blocking until it ends. `mlflow=None` disables MLflow logging.

    `on_progress` receives `{"kind": "step", ...}` (rank 0, about once a second) and `{"kind": "epoch",
    **metrics}` events. Reusing `name` and `storage_path` resumes an interrupted run.
    """
    import ray
    from ray.util.queue import Queue

    if cfg.dataset == "imagefolder":
        from trainers.data import check_imagefolder

        check_imagefolder(cfg.data_root, cfg.num_classes)  # fail before any worker starts
    storage_path = str(Path(storage_path or default_storage_path()).expanduser().resolve())
    name = name or f"finetune-{cfg.model}-{datetime.now():%Y%m%d-%H%M%S}"
    started_ray, dashboard = ensure_ray(ray_address)
    use_gpu = gpus_per_worker > 0
    cpus_per_worker = cpus_per_worker or default_cpus_per_worker(num_workers, use_gpu)

    run_logger = None
    if mlflow is not None:
        from trainers.mlflow_logging import RunLogger

        run_logger = RunLogger({**mlflow, "run_name": mlflow.get("run_name") or name,
                                "tags": {"convtune.kind": "train", "convtune.train_name": name,
                                         **(mlflow.get("tags") or {})}})
        mlflow = {**mlflow, "tracking_uri": run_logger.tracking_uri, "run_id": run_logger.run_id,
                  "log_best_model": True}  # rank 0 logs the best model at the end (a sweep trial does not)

    queue = Queue(maxsize=256, actor_options={"num_cpus": 0})
    result = FinetuneResult(name=name, storage_path=storage_path, dashboard_url=dashboard,
                            mlflow_run_id=run_logger.run_id if run_logger else None,
                            mlflow_tracking_uri=run_logger.tracking_uri if run_logger else None,
                            mlflow_experiment_id=run_logger.experiment_id if run_logger else None)
    trainer = build_torch_trainer(
        train_loop_config(cfg, cpus_per_worker=cpus_per_worker, mlflow=mlflow, progress_queue=queue),
        name=name, storage_path=storage_path, num_workers=num_workers, use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker or None,
        callbacks=[_progress_callback_class()(queue)], max_failures=max_failures)

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=fit, name="convtune-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not queue.empty():
            try:
                item = queue.get(timeout=0.5)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            if item.get("kind") == "epoch":
                result.history.append({k: v for k, v in item.items() if k != "kind"})
            if on_progress:
                on_progress(item)
        thread.join()
    finally:
        result.seconds = time.monotonic() - start
        error = outcome.get("error")
        if run_logger is not None:
            run_logger.owns_run = True
            run_logger.finish("FAILED" if error or not outcome else "FINISHED")
        with contextlib.suppress(Exception):
            ray.kill(queue.actor)
        if started_ray:
            ray.shutdown()

    if "error" in outcome:
        result.error = f"{type(outcome['error']).__name__}: {outcome['error']}"
        raise outcome["error"]
    train_result = outcome["result"]
    if result.history:
        best = max(result.history, key=lambda m: m.get(SCORE_ATTR, float("-inf")))
        result.best_val_top1, result.best_epoch = best.get(SCORE_ATTR), best.get("epoch")
        result.best_checkpoint = best.get("checkpoint_path")
    best_ckpt = (train_result.get_best_checkpoint(cfg.best_metric, cfg.best_mode)
                 if train_result.best_checkpoints else None)
    if best_ckpt is not None:
        result.best_checkpoint = best_ckpt.path
    return result

