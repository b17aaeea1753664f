"""Run one sweep: a Ray Tune search whose trials each launch a Ray Train finetune.

In Ray 2.60 (Train V2) a TorchTrainer cannot be handed to the Tuner; a trial is a function that
builds one and calls ``fit()``, with ``TuneReportCallback`` forwarding rank 0's per-epoch metrics to
Tune (docs/sweeps.md). The Train run of a trial has a deterministic name, so a retried or resumed
trial continues from its own last checkpoint.

Entry point of the Ray job the service submits (one job per sweep, submission id = sweep id)::

    python -m search_spaces.driver --spec SPEC.yaml --sweep-id ID --storage-path DIR --mlflow-uri URI

SIGINT and SIGTERM stop the sweep with its state saved; running it again with the same sweep id and
storage path resumes it. Exit codes: 0 finished, 3 interrupted (resumable), 2 invalid spec, 1 error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from search_spaces.spec import (
    SpecError,
    SweepSpec,
    check_resources,
    cluster_capacity,
    max_concurrent_trials,
    trial_finetune,
)

log = logging.getLogger("convtune.sweep")
#: What a trial driver reserves: no CPU (its Train workers reserve those), a little memory so the
#: bundle is not empty. Counting a CPU here would idle one core per concurrent trial on small hosts.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}
EXIT_OK, EXIT_ERROR, EXIT_SPEC, EXIT_INTERRUPTED = 0, 1, 2, 3


class SweepNotFoundError(LookupError):
    """``resume=True`` but the storage path holds no state for the sweep id."""


@dataclass
class SweepResult:
    """How a sweep ended. ``status``: finished, interrupted (resumable) or failed (every trial errored)."""

    sweep_id: str
    status: str
    experiment_path: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    mlflow_parent_run_id: str | None
    mlflow_url: str | None
    resumed: bool
    wall_s: float
    counts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its sampled config (shipped once with ``tune.with_parameters``)."""

    spec: dict[str, Any]
    sweep_id: str
    train_storage: str


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune trial: build this trial's FinetuneConfig and train it (Ray Train, or in this process)."""
    from ray import tune

    from search_spaces.tune_search import trial_params

    spec = SweepSpec.model_validate(ctx.spec)
    trial_id = tune.get_context().get_trial_id()
    # the trial's driver never imports timm; its workers validate the config fully
    finetune = trial_finetune(spec, trial_params(spec, config), torch_free=spec.resources.uses_train)
    res = spec.resources
    loop_config = {"finetune": finetune.model_dump(mode="json"), "mlflow": config.get("mlflow"),
                   "cpus_per_worker": res.threads_per_worker}
    if not res.uses_train:  # the best-model file must outlive the trial process: keep it in the Train storage
        return _train_in_process({**loop_config, "output_dir": _join(ctx.train_storage, f"{ctx.sweep_id}-{trial_id}")})

    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers.ray_run import build_torch_trainer

    trainer = build_torch_trainer(
        loop_config,
        name=f"{ctx.sweep_id}-{trial_id}",  # deterministic: a retry or resume continues this Train run
        storage_path=ctx.train_storage,
        num_workers=res.workers_per_trial,
        use_gpu=res.gpus_per_worker > 0,
        cpus_per_worker=res.cpus_per_worker,  # the reservation; the workers' threads are its whole part
        gpus_per_worker=res.gpus_per_worker,
        callbacks=[TuneReportCallback()],
        max_failures=spec.failures.worker_retries,
    )
    trainer.fit()


def _train_in_process(loop_config: dict[str, Any]) -> None:
    """A single-worker trial without a Train worker group: the loop runs here and reports to Tune.

    The training state (every ``checkpoint_every`` epochs and after the last) is persisted by Tune (``tune.report``); a retried or resumed trial gets
    it back from ``tune.get_checkpoint()`` and continues from it, as a Train run would.
    """
    import contextlib

    from ray import tune

    from trainers.loop import train_loop_per_worker

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)  # persists the directory before returning

    restored = tune.get_checkpoint()
    with restored.as_directory() if restored else contextlib.nullcontext() as resume_dir:
        if resume_dir:
            loop_config = {**loop_config, "resume_from": resume_dir}
        train_loop_per_worker(loop_config, reporter=report)


def reuse_trial_processes(spec: SweepSpec) -> bool:
    """Whether a trial process runs the next trial once its own has ended (Tune's ``reuse_actors``), so its
    imports (torch, Ray Train: seconds) are paid once per sweep instead of once per trial.

    Only where no scheduler stops trials mid-run (FIFO). Tune also hands the process of a trial it stopped
    to the next trial, and that reuse fails ("Trainable runner reuse requires reset_config()"): the stopped
    trial's function is still inside ``fit()``, or mid-epoch in-process, past Tune's 2 s wait for it.
    """
    return spec.scheduler.type == "fifo"


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What the Tune trial actor reserves: its worker's share when it trains in-process, else nothing."""
    res = spec.resources
    if res.uses_train:
        return dict(TRIAL_DRIVER_RESOURCES)
    return {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker, "memory": TRIAL_DRIVER_RESOURCES["memory"]}


# ---------------------------------------------------------------------------------------------- Ray

def ensure_ray(address: str | None = None) -> None:
    """Attach to ``address`` / $RAY_ADDRESS (a Ray job's cluster), else start a local Ray with the dashboard.

    The dashboard matters: Train frees the placement groups of stopped trials through the State API, and
    every process of the sweep is told where that API is (``trainers.ray_run.cluster_env``).
    """
    from trainers.ray_run import ensure_ray as _ensure_ray

    _ensure_ray(address)


def _cluster():
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return cluster_capacity(ray.cluster_resources(), nodes)


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if "://" in base else os.path.join(base, *parts)


# -------------------------------------------------------------------------------------------- sweep

def run_sweep(spec: SweepSpec, *, sweep_id: str, storage_path: str, mlflow_uri: str,
              ray_job_id: str | None = None, resume: bool = False,
              callbacks: tuple = (), trainable: Callable | None = None) -> SweepResult:
    """Run (or resume) the sweep ``sweep_id`` under ``storage_path`` and log it to ``mlflow_uri``.

    An existing sweep state at ``storage_path/sweep_id`` is always resumed: finished trials are kept,
    unfinished ones continue from their checkpoints. ``resume=True`` insists on that state existing.
    ``trainable`` replaces the Train-launching trial function (for tests of the search alone).
    """
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from search_spaces.cleanup import ReleaseStoppedTrials, release_all
    from search_spaces.tracking import SweepTracking, TrialRunCallback
    from search_spaces.tune_search import TargetStopper, build_param_space, build_scheduler, build_search_alg
    from trainers.data import check_data

    started = time.monotonic()
    # bad data (every unreadable image), batch or schedule: one message before Ray, MLflow or state
    check_data(trial_finetune(spec, {}), world_size=spec.resources.workers_per_trial)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own console table off (verbose=0): ours or none
    storage_path = storage_path if "://" in storage_path else os.path.abspath(os.path.expanduser(storage_path))
    ensure_ray()
    capacity = _cluster()
    check_resources(spec, capacity)
    concurrency = max_concurrent_trials(spec, capacity)
    experiment_path = _join(storage_path, sweep_id)
    restoring = tune.Tuner.can_restore(experiment_path)
    if resume and not restoring:
        raise SweepNotFoundError(f"no saved sweep {sweep_id!r} under {storage_path}; run it without --resume")

    tracking = SweepTracking(mlflow_uri, spec, sweep_id, ray_job_id)
    tracking.open_parent(resume=restoring)
    trial_runs = TrialRunCallback(tracking, spec.metric, spec.mode, spec.scheduler_max_epochs())
    job_id = ray.get_runtime_context().get_job_id()
    # result files are the trial history (table, curves) even when auto loggers are disabled
    run_callbacks = [JsonLoggerCallback(), CSVLoggerCallback(), trial_runs, *callbacks]
    if spec.resources.uses_train:  # stopped Train trials leave no placement group behind (search_spaces.cleanup)
        run_callbacks.append(ReleaseStoppedTrials(job_id))
    ctx = TrialContext(spec.model_dump(mode="json"), sweep_id, _join(storage_path, sweep_id, "_train"))
    fn = trainable or tune.with_parameters(run_trial, ctx=ctx)
    fn = tune.with_resources(fn, trial_resources(spec) if trainable is None else TRIAL_DRIVER_RESOURCES)
    stopper = TargetStopper(spec.metric, spec.mode, spec.stop_at) if spec.stop_at is not None else None

    if restoring:
        log.info("resuming sweep %s from %s", sweep_id, experiment_path)
        tuner = tune.Tuner.restore(experiment_path, trainable=fn, resume_unfinished=True, resume_errored=True)
        # The restored RunConfig holds the first run's callbacks; use this run's (live table, fresh client).
        tuner._local_tuner.get_run_config().callbacks = run_callbacks
    else:
        tuner = tune.Tuner(
            fn,
            param_space=build_param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode,
                search_alg=build_search_alg(spec, max_concurrent=concurrency, sweep_id=sweep_id),
                scheduler=build_scheduler(spec, tracking.assign_trial_run),
                # both search algorithms carry the concurrency limit themselves
                num_samples=spec.num_samples,
                time_budget_s=spec.time_budget_s, reuse_actors=reuse_trial_processes(spec),
            ),
            run_config=tune.RunConfig(
                name=sweep_id, storage_path=storage_path, callbacks=run_callbacks, stop=stopper, verbose=0,
                # in-process trials checkpoint through Tune (Train runs keep their own best 2)
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=spec.metric,
                                                        checkpoint_score_order=spec.mode),
                failure_config=tune.FailureConfig(max_failures=spec.failures.trial_retries),
            ),
        )

    previous = _stop_gracefully_on_sigterm()
    try:
        grid = tuner.fit()
    except BaseException:
        trial_runs.flush(30)
        tracking.kill_open_trial_runs()
        tracking.finish_parent("FAILED")
        raise
    finally:
        _restore_sigterm(previous)
        if spec.resources.uses_train:
            release_all(job_id)
    trial_runs.flush()  # the trials' metrics and ends, buffered while MLflow was unreachable
    return _finish(spec, sweep_id, experiment_path, grid, tracking, restoring, time.monotonic() - started,
                   interrupted=trial_runs.interrupted.is_set(),
                   running=trial_runs.started - trial_runs.ended)


def _stop_gracefully_on_sigterm():
    """SIGTERM takes Tune's SIGINT path: stop, save the experiment state, return from fit()."""
    try:
        return signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    except ValueError:  # not the main thread: the caller owns signals
        return None


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _finish(spec: SweepSpec, sweep_id: str, experiment_path: str, grid, tracking, resumed: bool,
            wall_s: float, *, interrupted: bool, running: set[str]) -> SweepResult:
    from search_spaces.registry import register_winner
    from search_spaces.tracking import log_sweep_summary

    trials, curves = _trial_table(spec, grid)
    interrupted = interrupted or any(t["status"] not in ("TERMINATED", "ERROR") for t in trials)
    counts: dict[str, int] = {}
    for t in trials:
        if interrupted and t["trial_id"] in running:
            t["outcome"] = "unfinished"  # shut down by the interrupt (Tune marks it terminated in memory)
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    best = _best(spec, trials)
    # runs of trials that were interrupted, or added but never started (time budget, stop_at)
    tracking.kill_open_trial_runs()
    if interrupted:
        status, mlflow_status = "interrupted", "KILLED"
    elif trials and all(t["status"] == "ERROR" for t in trials):
        status, mlflow_status = "failed", "FAILED"
    else:
        status, mlflow_status = "finished", "FINISHED"
    try:
        import pandas as pd

        log_sweep_summary(tracking, spec, pd.DataFrame(trials), curves, best, final=status != "interrupted")
    except Exception:  # noqa: BLE001 - the sweep's own results stand even if the summary upload fails
        log.warning("could not log the sweep summary to MLflow", exc_info=True)
    register_winner(tracking, spec, best, final=status == "finished", results=grid)  # never raises
    tracking.finish_parent(mlflow_status)
    return SweepResult(sweep_id=sweep_id, status=status, experiment_path=experiment_path, trials=trials, best=best,
                       mlflow_parent_run_id=tracking.parent_run_id, mlflow_url=tracking.run_url(),
                       resumed=resumed, wall_s=round(wall_s, 2), counts=counts)


def _trial_table(spec: SweepSpec, grid) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per trial (params, outcome, best metric, checkpoint) and each trial's learning curve."""
    from search_spaces.tune_search import trial_params

    rows, curves = [], {}
    max_epochs = spec.scheduler_max_epochs()
    trials = {t.trial_id: t for t in grid._experiment_analysis.trials}
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(result.path).split("_")[-1]
        trial = next((t for t in trials.values() if t.path == result.path), trials.get(trial_id))
        trial_id = trial.trial_id if trial is not None else trial_id
        df = result.metrics_dataframe
        row: dict[str, Any] = {"trial_id": trial_id, "status": trial.status if trial is not None else "UNKNOWN"}
        row.update(trial_params(spec, trial.config if trial is not None else result.config or {}))
        epochs, best, best_ckpt, last = 0, None, None, None
        if df is not None and spec.metric in df and len(df):
            df = df.dropna(subset=[spec.metric])
            if "epoch" in df:
                df = df.sort_values("epoch")
                epochs = int(df["epoch"].max())
                curves[trial_id] = (df["epoch"].tolist(), df[spec.metric].tolist())
            idx = df[spec.metric].idxmax() if spec.mode == "max" else df[spec.metric].idxmin()
            best, last = float(df.loc[idx, spec.metric]), float(df[spec.metric].iloc[-1])
            if "checkpoint_path" in df:
                best_ckpt = df.loc[idx, "checkpoint_path"]
                if not (isinstance(best_ckpt, str) and os.path.isdir(best_ckpt)):
                    best_ckpt = df["checkpoint_path"].dropna().iloc[-1] if df["checkpoint_path"].notna().any() \
                        else None
        if best_ckpt is None and result.best_checkpoints:  # in-process trials: checkpoints kept by Tune
            ckpt, _ = max(result.best_checkpoints, key=lambda cm: cm[1].get(spec.metric, float("-inf"))
                          * (1 if spec.mode == "max" else -1))
            best_ckpt = ckpt.path
        if row["status"] == "ERROR":
            outcome = "failed"
        elif row["status"] != "TERMINATED":
            outcome = "unfinished"
        else:
            outcome = "completed" if epochs >= max_epochs else "early_stopped"
        row.update({"outcome": outcome, "epochs": epochs, f"best_{spec.metric}": best,
                    f"last_{spec.metric}": last, "checkpoint_path": best_ckpt,
                    "error": str(result.error)[:300] if result.error else None,
                    "mlflow_run_id": ((trial.config if trial is not None else {}).get("mlflow") or {}).get("run_id")})
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows, curves


def _best(spec: SweepSpec, trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    key = f"best_{spec.metric}"
    scored = [t for t in trials if t.get(key) is not None]
    if not scored:
        return None
    top = (max if spec.mode == "max" else min)(scored, key=lambda t: t[key])
    params = {k: top[k] for k in spec.space if k in top}
    return {"trial_id": top["trial_id"], "metric": top[key], "params": params,
            "finetune": trial_finetune(spec, params).model_dump(mode="json"),
            "checkpoint_path": top["checkpoint_path"], "mlflow_run_id": top["mlflow_run_id"]}


# ---------------------------------------------------------------------------------------------- job

def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m search_spaces.driver",
                                     description="Run one convtune sweep (the Ray job entry point).")
    parser.add_argument("--spec", required=True, help="sweep spec file (YAML or JSON) or preset name")
    parser.add_argument("--sweep-id", required=True, help="sweep id: names the Tune experiment and MLflow runs")
    parser.add_argument("--storage-path", default=os.environ.get("CONVTUNE_STORAGE_PATH", "~/convtune_results"),
                        help="where sweep state and checkpoints live (shared path or s3:// on a cluster)")
    parser.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"),
                        help="MLflow tracking URI")
    parser.add_argument("--ray-job-id", default=None, help="tagged on the MLflow parent run (default: this job's)")
    parser.add_argument("--resume", action="store_true", help="fail unless saved state exists for the sweep id")
    parser.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--result-file", default=None, help="also write the SweepResult JSON here")
    parser.add_argument("--progress", action="store_true", help="print a live trial table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from search_spaces.spec import resolve_spec_source
    from trainers.data import DataError

    try:
        spec = resolve_spec_source(args.spec)
        check_spec_paths(spec)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return EXIT_SPEC
    ensure_ray(args.address)
    job_id = args.ray_job_id or os.environ.get("RAY_JOB_SUBMISSION_ID") or _runtime_job_id()
    callbacks = ()
    if args.progress:
        from search_spaces.progress import LiveTable

        callbacks = (LiveTable(spec),)
    try:
        result = run_sweep(spec, sweep_id=args.sweep_id, storage_path=args.storage_path, mlflow_uri=args.mlflow_uri,
                           ray_job_id=job_id, resume=args.resume, callbacks=callbacks)
    except (SpecError, DataError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_SPEC
    except SweepNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    payload = result.to_json()
    print(f"CONVTUNE_RESULT {payload}", flush=True)
    if args.result_file:
        with open(args.result_file, "w") as f:
            f.write(payload)
    return {"finished": EXIT_OK, "interrupted": EXIT_INTERRUPTED}.get(result.status, EXIT_ERROR)


def check_spec_paths(spec) -> None:
    """On the node that reads the data: every path in the spec lies inside the data roots the service handed
    over (``CONVTUNE_DATA_ROOTS``; a sweep started without the service has none, and is not restricted)."""
    from search_spaces.paths import path_errors, roots_from_env

    roots = roots_from_env()
    errors = path_errors(spec.model_dump(mode="json"), roots) if roots else []
    if errors:
        raise SpecError(errors)


def _runtime_job_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001
        return None


def result_from_json(payload: str | Mapping[str, Any]) -> SweepResult:
    data = json.loads(payload) if isinstance(payload, str) else dict(payload)
    return SweepResult(**data)


if __name__ == "__main__":
    sys.exit(main())
