"""MLflow logging from rank 0 of a finetune.

The run is either given (`{"run_id": ...}`: a sweep created the child run driver-side and owns its end)
or created here (`{"experiment_name": ...}`) and ended by `finish`. Metrics go out as one
`MlflowClient.log_batch` call per epoch. Tracking URIs must be absolute or remote before the workers
start, because Ray Train workers change directory (`absolute_tracking_uri`).

An MLflow outage does not stop or slow training: after the run is opened, every call goes into a bounded
buffer that a background thread delivers in order, retrying until the server answers again (`Outbox`).
`finish` waits for the buffer to drain (up to `CONVTUNE_MLFLOW_FLUSH_TIMEOUT_S`, default 600 s) before
ending the run, so the metrics of an outage reach MLflow and no run is left RUNNING once it is back.

In a sweep, a trial's epoch metrics are logged by the sweep's driver from the results Tune receives
(`search_spaces.tracking.TrialRunCallback`, through an `Outbox` of its own), not by rank 0: the run then
holds exactly what Tune saw, a trial that Tune stops right after a report loses nothing, and the worker's
first report never waits for MLflow. Rank 0 logs the set-up (params, param groups, LR plot) and artifacts.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "convtune-train"
MAX_PARAM_LEN = 6000
BUFFER_ITEMS = 1000  # pending MLflow calls; beyond it the oldest metrics are dropped (with a warning)
RETRY_S = (0.5, 10.0)  # first and longest wait between delivery attempts while MLflow is unreachable


def absolute_tracking_uri(uri: str | None = None) -> str:
    """`uri` (else $MLFLOW_TRACKING_URI, else ./mlflow.db) with relative paths made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if "://" not in uri:  # a bare path: a file store folder
        return Path(uri).expanduser().resolve().as_uri()
    scheme, rest = uri.split("://", 1)
    if scheme == "sqlite" and rest.startswith("/") and not rest.startswith("//"):
        # sqlite:///relative.db has one slash before a relative path; sqlite:////abs.db has two
        return f"sqlite:///{Path(rest[1:]).expanduser().resolve()}"
    if scheme == "file" and not rest.startswith("/"):
        return Path(rest).expanduser().resolve().as_uri()
    return uri


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            out[name] = text[:MAX_PARAM_LEN]
    return out


def plot_lr_schedule(path: Path, schedule, groups: list[dict[str, Any]], title: str) -> Path:
    """Every group's LR over the run's updates (groups with equal lr_scale share a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = schedule.total_steps
    steps = sorted(set(range(0, total, max(total // 1000, 1))) | {total - 1})
    base = [schedule.lr_at(s) for s in steps]
    by_scale: dict[float, list[str]] = {}
    for g in groups:
        by_scale.setdefault(g["lr_scale"], []).append(g["name"])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for scale, names in sorted(by_scale.items(), reverse=True):
        label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1})"
        ax.plot(steps, [b * scale for b in base], label=f"{label}  x{scale:.3g}", linewidth=1.2)
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    if len(by_scale) <= 16:
        ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass
class Call:
    what: str
    fn: Callable[[], None]
    key: str | None = None  # a newer call with the same key replaces a pending one (e.g. the best checkpoint)
    urgent: bool = False  # an epoch's metrics: delivered before pending deferrable calls (set-up, artifacts)
    deferrable: bool = False


class Outbox:
    """MLflow calls delivered in order by one background thread, retried while the server is unreachable.

    `put` never blocks. A remote (http) store is probed at `/health` before each delivery, so an outage
    costs one quick probe per retry instead of MLflow's own long HTTP back-off. A call the server rejects
    (HTTP 4xx) is dropped with an error; every other failure is retried, waiting `RETRY_S[0]` doubling to
    `RETRY_S[1]`. With more than `max_items` pending, the oldest droppable call is dropped with a warning.
    """

    def __init__(self, tracking_uri: str, *, max_items: int = BUFFER_ITEMS, retry_s: tuple[float, float] = RETRY_S):
        self.health_url = f"{tracking_uri.rstrip('/')}/health" if tracking_uri.startswith("http") else None
        self.max_items, self.retry_s = max_items, retry_s
        self.pending: collections.deque[Call] = collections.deque()
        self.cond = threading.Condition()
        self.busy = False
        self.down = False  # the last delivery attempt failed: an outage is under way
        self.dropped = 0
        self.thread: threading.Thread | None = None

    def put(self, call: Call) -> None:
        with self.cond:
            if call.key is not None:
                self.pending = collections.deque(c for c in self.pending if c.key != call.key)
            if call.urgent:  # ahead of the deferrable calls, behind the one being delivered and other urgent ones
                first = int(self.busy)
                at = next((i for i, c in enumerate(self.pending) if i >= first and c.deferrable), len(self.pending))
                self.pending.insert(at, call)
            else:
                self.pending.append(call)
            if len(self.pending) > self.max_items:
                oldest = next((c for c in self.pending if c.what == "metrics"), self.pending[0])
                self.pending.remove(oldest)
                self.dropped += 1
                log.warning("MLflow buffer full (%d calls): dropped the oldest %s", self.max_items, oldest.what)
            if self.thread is None:
                self.thread = threading.Thread(target=self._deliver, name="mlflow-outbox", daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every call is delivered; False if some are still pending after `timeout` seconds."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.pending and not self.busy, timeout)

    def __len__(self) -> int:
        with self.cond:
            return len(self.pending) + self.busy

    def _reachable(self) -> bool:
        if self.health_url is None:
            return True
        try:
            with urllib.request.urlopen(self.health_url, timeout=5) as resp:  # noqa: S310 - the tracking server
                return resp.status == 200
        except OSError:
            return False

    def _deliver(self) -> None:
        wait, down_since = self.retry_s[0], None
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending)
                call = self.pending[0]
                self.busy = True
            error = None
            if not self._reachable():
                error = "unreachable"
            else:
                try:
                    call.fn()
                except Exception as exc:  # noqa: BLE001 - retried below, or dropped when the server refuses it
                    error = exc
            with self.cond:
                if error is None or _rejected(error):
                    if error is not None:
                        log.error("MLflow refused %s, dropped: %s", call.what, error)
                    if self.pending and self.pending[0] is call:
                        self.pending.popleft()
                    self.busy = False
                    self.cond.notify_all()
            if error is None or _rejected(error):
                self.down = False
                if down_since is not None:
                    log.warning("MLflow reachable again after %.0f s; delivering %d buffered call(s)",
                                time.monotonic() - down_since, len(self))
                wait, down_since = self.retry_s[0], None
                continue
            if down_since is None:
                down_since = time.monotonic()
                log.warning("MLflow %s failed (%s); training goes on, %d call(s) buffered and retried",
                            call.what, error, len(self))
            with self.cond:
                self.busy, self.down = False, True
                self.cond.notify_all()
            time.sleep(wait)  # a retry delay in the background thread (no state to poll)
            wait = min(wait * 2, self.retry_s[1])


def metric_list(metrics: dict[str, Any], timestamp_ms: int, step: int) -> list:
    """MLflow `Metric`s of the numeric values in `metrics` (booleans and strings are left out)."""
    from mlflow.entities import Metric

    return [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)]


def _rejected(error: Exception | str) -> bool:
    """Retrying cannot help: the server (or local store) answered and refused the call (HTTP 4xx), or the
    call itself is broken (an exception that is neither an MLflow nor an I/O error)."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, str | OSError):
        return False
    if not isinstance(error, MlflowException):
        return True
    status = error.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


class RunLogger:
    """Rank 0's MLflow run for one finetune.

    A run created here is opened synchronously (a wrong URI fails at once). A given run (`run_id`, a
    sweep's trial) costs the training nothing: MLflow is imported and its client made by the `Outbox`
    thread on its first call, while the worker builds its data and model. Every call is buffered, so
    training never waits for MLflow. With `metrics_from_results` (a sweep's trial), `log_metrics` does
    nothing: the sweep's driver logs the metrics Tune receives.
    """

    def __init__(self, settings: dict[str, Any]):
        self.tracking_uri = absolute_tracking_uri(settings.get("tracking_uri"))
        self._client = None
        self._client_lock = threading.Lock()
        self.owns_run = not settings.get("run_id")
        self.metrics_from_results = bool(settings.get("metrics_from_results")) and not self.owns_run
        self.experiment_id: str | None = None
        if self.owns_run:
            name = settings.get("experiment_name") or DEFAULT_EXPERIMENT
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            tags = {k: str(v) for k, v in (settings.get("tags") or {}).items()}
            run = self.client.create_run(exp_id, run_name=settings.get("run_name"), tags=tags)
            self.run_id = run.info.run_id
            self.experiment_id = exp_id
        else:
            self.run_id = settings["run_id"]
        self.outbox = Outbox(self.tracking_uri, **settings.get("outbox", {}))
        self.spool = Path(tempfile.mkdtemp(prefix="convtune-mlflow-"))  # artifact copies awaiting upload

    @property
    def client(self):
        """The `MlflowClient`, made on first use (importing MLflow takes seconds)."""
        with self._client_lock:
            if self._client is None:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(self.tracking_uri)
            return self._client

    def log_params(self, params: dict[str, Any]) -> None:
        """Log the resolved config; keys the run already holds (a sweep may log them) are skipped."""

        def send() -> None:  # MLflow is imported in the Outbox thread, never on the training thread
            from mlflow.entities import Param

            existing = self.client.get_run(self.run_id).data.params
            items = [Param(k, v) for k, v in flatten_params(params).items() if k not in existing]
            for i in range(0, len(items), 100):  # MLflow's per-batch param limit
                self.client.log_batch(self.run_id, params=items[i : i + 100])

        self.outbox.put(Call("params", send, deferrable=True))

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if self.metrics_from_results:
            return
        now = int(time.time() * 1000)  # the time of the epoch, not of the (possibly late) delivery
        self.outbox.put(Call("metrics", lambda: self.client.log_batch(self.run_id, metrics=metric_list(metrics, now, step)),
                             urgent=True))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.outbox.put(Call(f"text {artifact_file}", lambda: self.client.log_text(self.run_id, text, artifact_file),
                              key=f"text:{artifact_file}", deferrable=True))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a copy of `path` (the caller may delete it at once); a newer file for the same artifact
        replaces a pending older one."""
        key = f"artifact:{artifact_path or ''}/{Path(path).name}"
        copy = Path(tempfile.mkdtemp(dir=self.spool)) / Path(path).name
        shutil.copy2(path, copy)

        def send() -> None:
            self.client.log_artifact(self.run_id, str(copy), artifact_path)
            shutil.rmtree(copy.parent, ignore_errors=True)

        self.outbox.put(Call(f"artifact {key.split(':', 1)[1]}", send, key=key))

    def log_setup(self, *, params: dict[str, Any], groups: list[dict[str, Any]], schedule, model_name: str) -> None:
        """Params, the param-group table and the LR schedule plot, once at the start."""
        from trainers.param_groups import group_summaries, param_group_table

        self.log_params(params)
        self.log_text(param_group_table(groups), "param_groups.txt")
        self.log_text(json.dumps(group_summaries(groups), indent=1), "param_groups.json")
        groups = [{"name": g["name"], "lr_scale": g["lr_scale"]} for g in groups]  # no tensors in the thread
        title = f"{model_name}: {schedule.name}, base lr {schedule.base_lr:.3g}"

        def send_plot() -> None:  # drawn by the Outbox thread (matplotlib is imported there), off the loop
            with tempfile.TemporaryDirectory() as tmp:
                plot = plot_lr_schedule(Path(tmp) / "lr_schedule.png", schedule, groups, title)
                self.client.log_artifact(self.run_id, str(plot))

        self.outbox.put(Call("artifact lr_schedule.png", send_plot, key="artifact:/lr_schedule.png", deferrable=True))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the buffered calls (default `CONVTUNE_MLFLOW_FLUSH_TIMEOUT_S`); False if some remain."""
        if timeout is None:
            timeout = float(os.environ.get("CONVTUNE_MLFLOW_FLUSH_TIMEOUT_S", "600"))
        if self.outbox.flush(timeout):
            return True
        log.error("MLflow run %s: %d call(s) not delivered after waiting %.0f s (server unreachable at %s)",
                  self.run_id, len(self.outbox), timeout, self.tracking_uri)
        return False

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        """Deliver everything buffered, then end the run if this logger created it (a sweep's run is ended
        by the sweep)."""
        if self.owns_run:
            self.outbox.put(Call(f"end ({status})", lambda: self.client.set_terminated(self.run_id, status)))
        if self.flush(timeout):
            shutil.rmtree(self.spool, ignore_errors=True)
