"""Read a sweep's runs back from MLflow: the parent run (tagged with the sweep id) and one child run
per trial. Only the reconciler reads them (service.trials keeps the service's copy); API reads don't."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

# the tags search_spaces.tracking puts on a sweep's runs
SWEEP_TAG = "convtune.sweep_id"
TRIAL_TAG = "convtune.trial_id"
KIND_TAG = "convtune.kind"  # "sweep" on the parent run, "trial" on each child
OUTCOME_TAG = "convtune.outcome"  # completed | early_stopped | failed, set when Tune ends the trial

# MLflow's client retries for minutes by default; an API request should fail fast instead
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class MlflowUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached (answers 503)."""


@dataclass
class TrialRecord:
    trial_id: str
    run_id: str
    status: str  # RUNNING FINISHED STOPPED_EARLY FAILED KILLED
    params: dict[str, str]
    metrics: dict[str, float]
    start_time: int | None
    end_time: int | None


@dataclass
class SweepRuns:
    experiment_id: str | None = None
    parent_run_id: str | None = None
    parent_status: str | None = None
    parent_tags: dict[str, str] = field(default_factory=dict)
    trials: list[TrialRecord] = field(default_factory=list)
    missing: str | None = None  # why there is nothing to show (the runs were deleted in MLflow)


def trial_status(run) -> str:
    """PENDING (run made, trial not started), RUNNING, FINISHED, STOPPED_EARLY, FAILED or KILLED."""
    status = run.info.status
    if status == "SCHEDULED":
        return "PENDING"
    if status == "FINISHED" and run.data.tags.get(OUTCOME_TAG) == "early_stopped":
        return "STOPPED_EARLY"
    return status


class MlflowReader:
    def __init__(self, tracking_uri: str, cache_ttl_s: float = 2.0):
        self.tracking_uri = tracking_uri
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, SweepRuns]] = {}

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _guard(self, fn, *args, **kwargs):
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")):
                raise LookupError(str(exc)) from exc
            raise MlflowUnavailable(f"MLflow at {self.tracking_uri} failed: {exc}") from exc
        except OSError as exc:  # requests' ConnectionError is an OSError
            raise MlflowUnavailable(f"MLflow at {self.tracking_uri} is unreachable: {exc}") from exc

    def ping(self) -> None:
        if self.tracking_uri.startswith(("http://", "https://")):
            import requests

            try:
                requests.get(f"{self.tracking_uri.rstrip('/')}/health", timeout=3).raise_for_status()
            except Exception as exc:
                raise MlflowUnavailable(f"MLflow at {self.tracking_uri} is unreachable: {exc}") from exc
        else:
            self._guard(self._client().search_experiments, max_results=1)

    def find_parent(self, sweep_id: str, experiment_name: str | None = None, experiment_id: str | None = None):
        client = self._client()
        if not experiment_id and experiment_name:
            experiment = self._guard(client.get_experiment_by_name, experiment_name)
            experiment_id = experiment.experiment_id if experiment else None
        if not experiment_id:
            return None
        runs = self._guard(client.search_runs, [experiment_id],
                           filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}' and tags.`{KIND_TAG}` = 'sweep'",
                           max_results=1)
        return runs[0] if runs else None

    def sweep_runs(self, sweep_id: str, experiment_name: str | None = None, experiment_id: str | None = None,
                   parent_run_id: str | None = None, use_cache: bool = True) -> SweepRuns:
        now = time.monotonic()
        cached = self._cache.get(sweep_id)
        if use_cache and cached and now - cached[0] < self.cache_ttl_s:
            return cached[1]
        try:
            result = self._read_runs(sweep_id, experiment_name, experiment_id, parent_run_id)
        except LookupError as exc:  # the run or experiment was deleted in MLflow: the sweep stays readable
            result = SweepRuns(missing=f"the sweep's MLflow runs no longer exist ({str(exc)[:200]})")
        self._cache[sweep_id] = (now, result)
        return result

    def _read_runs(self, sweep_id: str, experiment_name: str | None, experiment_id: str | None,
                   parent_run_id: str | None) -> SweepRuns:
        client = self._client()
        if parent_run_id:
            parent = self._guard(client.get_run, parent_run_id)
        else:
            parent = self.find_parent(sweep_id, experiment_name, experiment_id)
        if parent is not None and parent.info.lifecycle_stage == "deleted":
            raise LookupError(f"run {parent.info.run_id} was deleted")
        result = SweepRuns()
        if parent is not None:
            result.experiment_id = parent.info.experiment_id
            result.parent_run_id = parent.info.run_id
            result.parent_status = parent.info.status
            result.parent_tags = dict(parent.data.tags)
            children = []
            token = None
            while True:
                page = self._guard(client.search_runs, [result.experiment_id],
                                   filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}' and tags.`{KIND_TAG}` = 'trial'",
                                   max_results=1000, page_token=token,
                                   order_by=["attributes.start_time ASC"])
                children.extend(page)
                token = page.token
                if not token:
                    break
            result.trials = [
                TrialRecord(
                    trial_id=run.data.tags.get(TRIAL_TAG) or run.info.run_name,
                    run_id=run.info.run_id, status=trial_status(run), params=dict(run.data.params),
                    metrics=dict(run.data.metrics), start_time=run.info.start_time, end_time=run.info.end_time)
                for run in children
            ]
        return result

    def finalize(self, sweep_id: str, runs: SweepRuns, status: str) -> int:
        """End every run of the sweep still RUNNING (parent included) with ``status``; returns how many.

        The driver ends its runs on a graceful stop; this is the safety net for a driver that was
        killed hard (SIGKILL after the stop grace period, a lost node), so no run stays RUNNING.
        """
        client = self._client()
        ended = 0
        for trial in runs.trials:
            if trial.status in ("RUNNING", "PENDING"):
                self._guard(client.set_terminated, trial.run_id, status)
                ended += 1
        if runs.parent_run_id and runs.parent_status == "RUNNING":
            self._guard(client.set_terminated, runs.parent_run_id, status)
            ended += 1
        self._cache.pop(sweep_id, None)
        return ended

    def run_url(self, public_url: str, experiment_id: str | None, run_id: str | None) -> str | None:
        if not experiment_id:
            return None
        if run_id:
            return f"{public_url}/#/experiments/{experiment_id}/runs/{run_id}"
        return f"{public_url}/#/experiments/{experiment_id}"
