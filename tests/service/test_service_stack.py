"""`convtune up/down/demo` and the client commands, run as a user runs them (subprocesses)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]
LOCK_PATH = Path(tempfile.gettempdir()) / "convtune-ray-tests.lock"


def convtune(*args, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[2])


def clean_env(data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVTUNE_")}
    env["CONVTUNE_DATA_DIR"] = str(data_dir)
    return env


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def host_ray_lock(timeout: float = 900):
    """The host-wide lock the session Ray fixture uses: this test starts a Ray head of its own."""
    lock = open(LOCK_PATH, "w")  # noqa: SIM115
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                pytest.fail("could not get the host Ray lock (is the session Ray cluster already up? this test "
                            "must run first; tests/service/conftest.py orders it)")
            time.sleep(1)


def test_up_down_starts_and_stops_its_own_stack(tmp_path, helpers):
    data_dir = tmp_path / "stack"
    env = clean_env(data_dir)
    ports = [str(helpers.free_port()) for _ in range(4)]
    lock = host_ray_lock()
    try:
        up = convtune("up", "--port", ports[0], "--dashboard-port", ports[1], "--mlflow-port", ports[2],
                      "--ray-port", ports[3], "--num-cpus", "1", "--num-gpus", "0", env=env)
        state = json.loads((data_dir / "stack.json").read_text()) if (data_dir / "stack.json").exists() else {}
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            assert "convtune is up" in up.stdout
            ready = httpx.get(f"{state['api_url']}/readyz").json()
            assert ready["ready"] and all(c["ok"] for c in ready["components"].values()), ready
            assert state["ray"]["url"] == f"http://127.0.0.1:{ports[1]}"
            again = convtune("up", "--port", ports[0], "--dashboard-port", ports[1], "--mlflow-port", ports[2],
                             env=env)
            assert again.returncode == 0 and "already running" in again.stdout  # idempotent
            status = convtune("status", env=env)  # finds the API through the stack's state file
            assert status.returncode == 0 and "no sweeps" in status.stdout, status.stderr
        finally:
            down = convtune("down", env=env)
        assert down.returncode == 0 and "stack stopped" in down.stdout, down.stderr
        pids = [state[name]["pid"] for name in ("ray", "mlflow", "api")]
        helpers.wait_until(lambda: all(gone(pid) for pid in pids), 60, "the stack's processes to exit")
        assert not (data_dir / "stack.json").exists()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{ports[0]}/healthz")
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def test_demo_runs_the_main_job_end_to_end(tmp_path, tiny_spec, ray_cluster, helpers):
    data_dir = tmp_path / "demo"
    env = clean_env(data_dir)
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump({**tiny_spec, "num_samples": 1}))  # one trial: the demo's path, not its size
    api_port, mlflow_port = helpers.free_port(), helpers.free_port()
    try:
        demo = convtune("demo", "--ray-address", ray_cluster.dashboard_url, "--spec", str(spec_file),
                        "--port", str(api_port), "--mlflow-port", str(mlflow_port), "--interval", "2", env=env)
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert "best trial:" in demo.stdout and "val_top1 = " in demo.stdout
        assert f"browse it in MLflow: http://127.0.0.1:{mlflow_port}/#/experiments/" in demo.stdout
        sweep_id = demo.stdout.split("as ", 1)[1].split(";", 1)[0].strip()

        status = convtune("status", sweep_id, env=env)
        assert status.returncode == 0 and "SUCCEEDED" in status.stdout and "1 finished" in status.stdout
        opened = convtune("open", sweep_id, env=env)
        assert opened.returncode == 0 and opened.stdout.startswith(f"http://127.0.0.1:{mlflow_port}/#/experiments/")
        logs = convtune("logs", sweep_id, "--tail", "5", env=env)
        assert logs.returncode == 0 and 0 < len(logs.stdout.splitlines()) <= 5
        resubmit = convtune("submit", str(spec_file), "--dry-run", env=env)
        assert resubmit.returncode == 0 and "trials: 1" in resubmit.stdout
        missing = convtune("status", "sw-000000000000", env=env)
        assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    finally:
        down = convtune("down", env=env)
    assert down.returncode == 0
    assert httpx.get(f"{ray_cluster.dashboard_url}/api/version").status_code == 200  # an external Ray stays up
