"""Fixtures for the service tests: settings against the session's real Ray head and MLflow server,
an in-process client for API logic, and a real uvicorn API process for end-to-end runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from testkit import free_port


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll ``predicate`` until truthy (its value is returned); fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc!r})")

REPO = Path(__file__).resolve().parents[2]

# The test that starts its own Ray head (`convtune up`) must run before the session cluster exists:
# two Ray clusters on one host break Train's placement-group cleaner, and the session fixture holds
# the host lock until the end.
FIRST = "test_up_down_starts_and_stops_its_own_stack"


def pytest_collection_modifyitems(session, config, items):
    first = [item for item in items if item.name == FIRST]
    if first:
        items[:] = first + [item for item in items if item.name != FIRST]


TINY_SPEC = {
    "name": "tiny",
    "description": "the quickstart shrunk for tests: 2 trials of 2 epochs x 2 steps",
    "base": {"model": "convnextv2_atto", "dataset": "digits", "input_size": 32, "epochs": 2,
             "steps_per_epoch_limit": 2, "batch_size": 32},
    "space": {"blr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
              "layer_decay": {"type": "uniform", "low": 0.7, "high": 1.0}},
    "search": {"algorithm": "random", "seed": 0},
    "scheduler": {"type": "fifo"},
    "metric": "val_top1", "mode": "max",
    "num_samples": 2,
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0,
                  "max_concurrent_trials": 1},
    "failures": {"trial_retries": 0, "worker_retries": 0},
}


@pytest.fixture
def tiny_spec() -> dict:
    return json.loads(json.dumps(TINY_SPEC))


def service_env(data_dir: Path, ray_url: str, mlflow_url: str, **extra) -> dict[str, str]:
    env = {
        "CONVTUNE_DATA_DIR": str(data_dir),
        "CONVTUNE_RAY_ADDRESS": ray_url,
        "CONVTUNE_MLFLOW_TRACKING_URI": mlflow_url,
        "CONVTUNE_RECONCILE_INTERVAL_S": "1",
        "CONVTUNE_JOB_STOP_WAIT_S": "60",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def make_settings(tmp_path, ray_cluster, mlflow_server, database_url):
    """Settings against the session's Ray and MLflow, on SQLite and on PostgreSQL (`database_url`)."""
    from service.settings import Settings

    def make(**overrides):
        values = dict(data_dir=tmp_path / "data", ray_address=ray_cluster.dashboard_url,
                      mlflow_tracking_uri=mlflow_server.url, reconcile_interval_s=1.0, database_url=database_url)
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def make_client(make_settings):
    """A TestClient over the ASGI app (lifespan and reconciler on) for tests of API logic."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    clients = []

    def make(token: str | None = None, **overrides):
        app = create_app(make_settings(**overrides))
        # a loopback client on a loopback host name: what the exposure guards admit while auth is off
        client = TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000),
                            headers={"Authorization": f"Bearer {token}"} if token else {})
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


class ApiProcess:
    """`convtune serve` in its own process on a free port: real HTTP, and a process tests can kill."""

    def __init__(self, env: dict[str, str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "CONVTUNE_PORT": str(self.port), "CONVTUNE_HOST": "127.0.0.1"}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> ApiProcess:
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--log-level", "warning"],
                                     cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_until(lambda: self.proc.poll() is None and httpx.get(f"{self.url}/healthz").status_code == 200,
                   60, f"the API at {self.url} (log {self.log})")
        return self

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30,
                            headers={"Authorization": f"Bearer {token}"} if token else {})


@pytest.fixture
def api_process(tmp_path, ray_cluster, mlflow_server):
    procs: list[ApiProcess] = []

    def make(**extra) -> ApiProcess:
        env = service_env(tmp_path / "data", ray_cluster.dashboard_url, mlflow_server.url, **extra)
        proc = ApiProcess(env, tmp_path / f"api-{len(procs)}.log")
        procs.append(proc)
        return proc

    yield make
    for proc in procs:
        proc.kill(signal.SIGTERM)


def wait_status(client: httpx.Client, sweep_id: str, wanted: set[str], timeout: float) -> dict:
    """Poll the sweep until its status is in ``wanted``; fail on another terminal status."""
    seen = {}

    def check():
        detail = client.get(f"/v1/sweeps/{sweep_id}").json()
        seen["last"] = detail
        status = detail["status"]
        if status in wanted:
            return detail
        if status in {"SUCCEEDED", "FAILED", "STOPPED"}:
            raise AssertionError(f"sweep ended {status}: {detail.get('message')}")
        return None

    try:
        return wait_until(check, timeout, f"sweep {sweep_id} to reach {wanted}", interval=1.0)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; last: {json.dumps(seen.get('last'))[:2000]}") from None


def cancel_all_jobs(ray_url: str) -> None:
    """Leave the session cluster idle for the next test."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_url)

    def submitted():  # jobs of other tests' `ray.init` drivers have no submission id and are not ours to stop
        return [j for j in client.list_jobs() if j.submission_id]

    for job in submitted():
        if not job.status.is_terminal():
            client.stop_job(job.submission_id)
    wait_until(lambda: all(j.status.is_terminal() for j in submitted()), 120, "jobs to stop")




@pytest.fixture(scope="session")
def helpers():
    """Plain helpers for the tests (test modules cannot import from conftest)."""
    import types

    return types.SimpleNamespace(wait_until=wait_until, wait_status=wait_status, free_port=free_port,
                                 cancel_all_jobs=cancel_all_jobs, service_env=service_env, REPO=REPO,
                                 ApiProcess=ApiProcess)
