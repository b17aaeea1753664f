"""MLflow for a sweep: one parent run per sweep, one child run per trial, all managed driver-side.

Child runs are created when Tune adds a trial (so its config carries the run id rank 0 logs its set-up
into), get every result Tune receives as the epoch's metrics, and are finished by :class:`TrialRunCallback`
when Tune completes, stops or fails the trial: a trial stopped by ASHA or killed with its actor never
stays RUNNING, and its run holds exactly the epochs Tune saw. Those calls go through a buffer that a
background thread delivers in order (`trainers.mlflow_logging.Outbox`), so an MLflow outage neither
stalls the sweep nor loses the metrics of its epochs; the driver waits for it before the summary. The parent run ends with the best
trial's config, metric and checkpoint, a trial table and plots (:func:`log_sweep_summary`).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from search_spaces.spec import MLFLOW_KEY, SweepSpec
from trainers.mlflow_logging import Call, Outbox, metric_list

log = logging.getLogger(__name__)
TAG_SWEEP = "convtune.sweep_id"
TAG_TRIAL = "convtune.trial_id"
TAG_KIND = "convtune.kind"
TAG_EXECUTION = "convtune.execution"  # ray_train (every trial, by default) or in_process (the opt-in)
TERMINAL = ("FINISHED", "FAILED", "KILLED")
# what Tune adds to every result (iteration counters, times, host): not the trainer's metrics
TUNE_RESULT_KEYS = frozenset(AUTO_RESULT_KEYS) | {"timesteps_this_iter", "episodes_this_iter", "done",
                                                  "should_checkpoint", "trial_id", "experiment_tag"}
DRIVER_BUFFER_ITEMS = 20_000  # pending MLflow calls of all trials while the server is unreachable


def _batched(items: list, size: int = 100):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class SweepTracking:
    """The sweep's MLflow experiment and parent run; picklable (the client is made on demand)."""

    def __init__(self, tracking_uri: str, spec: SweepSpec, sweep_id: str, ray_job_id: str | None = None):
        self.tracking_uri, self.sweep_id, self.ray_job_id = tracking_uri, sweep_id, ray_job_id
        self.spec = spec
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._client: MlflowClient | None = None

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # ------------------------------------------------------------------------------------- parent run
    def open_parent(self, *, resume: bool) -> str:
        """Create the sweep's parent run, or (``resume``) reopen the one an earlier run of this sweep made."""
        exp = self.client.get_experiment_by_name(self.spec.experiment_name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(self.spec.experiment_name)
        found = resume and self.client.search_runs(
            [self.experiment_id], f"tags.`{TAG_SWEEP}` = '{self.sweep_id}' and tags.`{TAG_KIND}` = 'sweep'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            self.parent_run_id = found[0].info.run_id
            self.client.update_run(self.parent_run_id, status="RUNNING")
            self.client.set_tag(self.parent_run_id, "convtune.resumed", "true")
        else:
            run = self.client.create_run(self.experiment_id, run_name=self.sweep_id, tags={
                TAG_SWEEP: self.sweep_id, TAG_KIND: "sweep", "convtune.spec_name": self.spec.name,
                "ray.job_id": self.ray_job_id or "", "mlflow.note.content": self.spec.description})
            self.parent_run_id = run.info.run_id
            params = [Param(f"sweep.{k}", str(v)[:500]) for k, v in {
                "search": self.spec.search.algorithm, "scheduler": self.spec.scheduler.type,
                "metric": self.spec.metric, "mode": self.spec.mode, "num_samples": self.spec.num_samples,
                "space": ",".join(self.spec.space)}.items()]
            self.client.log_batch(self.parent_run_id, params=params)
            self.client.log_text(self.parent_run_id, yaml.safe_dump(self.spec.model_dump(mode="json"),
                                                                    sort_keys=False), "sweep_spec.yaml")
        if self.ray_job_id:
            self.client.set_tag(self.parent_run_id, "ray.job_id", self.ray_job_id)
        return self.parent_run_id

    def finish_parent(self, status: str) -> None:
        self.client.set_terminated(self.parent_run_id, status=status)

    def run_url(self, run_id: str | None = None) -> str:
        base = self.tracking_uri.rstrip("/")
        if not base.startswith("http"):
            return f"{base} (experiment {self.experiment_id}, run {run_id or self.parent_run_id})"
        return f"{base}/#/experiments/{self.experiment_id}/runs/{run_id or self.parent_run_id}"

    # --------------------------------------------------------------------------------------- children
    def assign_trial_run(self, trial) -> None:
        """Scheduler hook: make the trial's child run (once) and put its id into the trial's config."""
        from search_spaces.tune_search import trial_params

        current = trial.config.get(MLFLOW_KEY) or {}
        if current.get("run_id"):
            return
        run = self.client.create_run(self.experiment_id, run_name=f"{self.sweep_id}-{trial.trial_id}", tags={
            "mlflow.parentRunId": self.parent_run_id, TAG_SWEEP: self.sweep_id, TAG_TRIAL: trial.trial_id,
            TAG_KIND: "trial", TAG_EXECUTION: "ray_train" if self.spec.resources.uses_train else "in_process"})
        params = [Param(k, str(v)[:500]) for k, v in trial_params(self.spec, trial.config).items()]
        if params:
            self.client.log_batch(run.info.run_id, params=params)
        self.client.update_run(run.info.run_id, status="SCHEDULED")
        trial.config[MLFLOW_KEY] = {"tracking_uri": self.tracking_uri, "run_id": run.info.run_id,
                                    "experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id,
                                    "metrics_from_results": True}  # TrialRunCallback logs them

    def trial_runs(self) -> list:
        return self.client.search_runs([self.experiment_id], f"tags.`{TAG_SWEEP}` = '{self.sweep_id}' and "
                                       f"tags.`{TAG_KIND}` = 'trial'", max_results=5000)

    def kill_open_trial_runs(self) -> int:
        """Mark child runs that are not terminal (interrupted sweep) KILLED; a resume reopens them."""
        n = 0
        for run in self.trial_runs():
            if run.info.status not in TERMINAL:
                self.client.set_terminated(run.info.run_id, status="KILLED")
                n += 1
        return n


class TrialRunCallback(Callback):
    """Driver-side life cycle of the child runs: RUNNING on start, each result's metrics (step = epoch),
    FINISHED/FAILED at the end, all delivered in order by one `Outbox` (`flush` waits for it).

    It also notices an interrupt (SIGINT/SIGUSR1, which Tune turns into "save state and return"):
    trials Tune then shuts down are not finished (they resume later) and stay out of ``ended``.
    """

    def __init__(self, tracking: SweepTracking, metric: str, mode: str, max_epochs: int):
        self.tracking, self.metric, self.mode, self.max_epochs = tracking, metric, mode, max_epochs
        self.interrupted = threading.Event()
        self.started: set[str] = set()
        self.ended: set[str] = set()
        self._outbox: Outbox | None = None

    def __getstate__(self):  # pickled into the Tuner state; events, ids and the buffer belong to one run
        return {**self.__dict__, "interrupted": None, "started": set(), "ended": set(), "_outbox": None}

    @property
    def outbox(self) -> Outbox:
        if getattr(self, "_outbox", None) is None:
            self._outbox = Outbox(self.tracking.tracking_uri, max_items=DRIVER_BUFFER_ITEMS)
        return self._outbox

    def _send(self, what: str, fn) -> None:
        self.outbox.put(Call(what, fn))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for every buffered call (default `CONVTUNE_MLFLOW_FLUSH_TIMEOUT_S`, 600 s); False if some remain."""
        if getattr(self, "_outbox", None) is None:
            return True
        if timeout is None:
            timeout = float(os.environ.get("CONVTUNE_MLFLOW_FLUSH_TIMEOUT_S", "600"))
        if self._outbox.flush(timeout):
            return True
        log.error("%d MLflow call(s) of the sweep's trials not delivered after %.0f s (server unreachable at %s)",
                  len(self._outbox), timeout, self.tracking.tracking_uri)
        return False

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.interrupted = threading.Event()

    def setup(self, **info):
        """Runs inside ``Tuner.fit`` after Tune installed its SIGINT handler: wrap it to notice the stop."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGUSR1):
            previous = signal.getsignal(sig)
            if callable(previous):
                signal.signal(sig, self._wrap(previous))

    def _wrap(self, previous):
        def handler(signum, frame):
            self.interrupted.set()
            previous(signum, frame)
        return handler

    @staticmethod
    def _run_id(trial) -> str | None:
        return (trial.config.get(MLFLOW_KEY) or {}).get("run_id")

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.add(trial.trial_id)
        if run_id := self._run_id(trial):
            self._send("running", lambda: self.tracking.client.update_run(run_id, status="RUNNING"))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_id(trial)
        if not run_id or "epoch" not in result:
            return
        metrics = {k: v for k, v in result.items() if k not in TUNE_RESULT_KEYS}
        when = int(float(result.get("timestamp") or time.time()) * 1000)  # the epoch's time, not the delivery's
        items = metric_list(metrics, when, int(result["epoch"]))
        self._send("metrics", lambda: self.tracking.client.log_batch(run_id, metrics=items))

    def _finish(self, trial, status: str, extra_tags: Mapping[str, str]):
        run_id = self._run_id(trial)
        if not run_id:
            return
        last = trial.last_result or {}
        epochs = int(last.get("epoch") or 0)
        tags = {"convtune.epochs_trained": str(epochs), **extra_tags}
        metrics = []
        if self.metric in last:
            best = trial.metric_analysis.get(self.metric, {}).get(self.mode, last[self.metric])
            metrics.append(Metric(f"best_{self.metric}", float(best), int(time.time() * 1000), epochs))

        def send() -> None:
            self.tracking.client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
            self.tracking.client.set_terminated(run_id, status=status)

        self._send(f"end ({status})", send)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.interrupted.is_set():
            return  # shut down by the interrupt, not finished: resumes with the sweep
        self.ended.add(trial.trial_id)
        epochs = int((trial.last_result or {}).get("epoch") or 0)
        outcome = "completed" if epochs >= self.max_epochs else "early_stopped"
        self._finish(trial, "FINISHED", {"convtune.outcome": outcome})

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.interrupted.is_set():
            return
        self.ended.add(trial.trial_id)
        self._finish(trial, "FAILED", {"convtune.outcome": "failed",
                                       "convtune.error": str(getattr(trial, "error_file", "") or "")[:500]})


# ----------------------------------------------------------------------------------- final summary

def log_sweep_summary(tracking: SweepTracking, spec: SweepSpec, table, curves: Mapping[str, Any],
                      best: Mapping[str, Any] | None, *, final: bool = True) -> None:
    """Parent run: best config/metric/checkpoint, the trial table (CSV) and plots.

    An interrupted sweep (``final=False``) logs the table, plots and best-so-far metric only: MLflow
    params cannot change, so the best config is logged once, when the sweep finishes.
    """
    client, run_id = tracking.client, tracking.parent_run_id
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table.to_csv(tmp / "trials.csv", index=False)
        client.log_artifact(run_id, str(tmp / "trials.csv"))
        for path in _plots(spec, table, curves, tmp):
            client.log_artifact(run_id, str(path), "plots")
    if not best:
        return
    if not final:
        client.log_batch(run_id, metrics=[Metric(f"best_{spec.metric}", float(best["metric"]),
                                                 int(time.time() * 1000), 0)])
        return
    client.log_text(run_id, yaml.safe_dump(best["finetune"], sort_keys=False), "best/finetune_config.yaml")
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"best_{spec.metric}", float(best["metric"]), now, 0),
                                      Metric("trials_total", float(len(table)), now, 0)],
                     params=[Param(f"best.{k}", str(v)[:500]) for k, v in best["params"].items()],
                     tags=[RunTag("convtune.best_trial_id", best["trial_id"]),
                           RunTag("convtune.best_checkpoint", str(best.get("checkpoint_path") or ""))])
    ckpt = best.get("checkpoint_path")
    if ckpt and Path(ckpt).is_dir():
        client.log_artifacts(run_id, ckpt, "best/checkpoint")


def _plots(spec: SweepSpec, table, curves: Mapping[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    metric_col = f"best_{spec.metric}"
    for name in spec.space:
        if name not in table or table[name].isna().all() or metric_col not in table:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        sub = table[[name, metric_col]].dropna()
        x = sub[name]
        if x.map(lambda v: isinstance(v, (int, float))).all():
            ax.scatter(x.astype(float), sub[metric_col])
            if getattr(spec.space[name], "type", "") == "loguniform":
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in x})
            ax.scatter([labels.index(str(v)) for v in x], sub[metric_col])
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlabel(name)
        ax.set_ylabel(metric_col)
        ax.set_title(f"{spec.metric} vs {name}")
        fig.tight_layout()
        paths.append(out / f"{spec.metric}_vs_{name}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for trial_id, (epochs, values) in curves.items():
            ax.plot(epochs, values, marker="o", ms=3, label=trial_id)
        ax.set_xlabel("epoch")
        ax.set_ylabel(spec.metric)
        ax.set_title("learning curves")
        if len(curves) <= 12:
            ax.legend(fontsize=6)
        fig.tight_layout()
        paths.append(out / "learning_curves.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths
