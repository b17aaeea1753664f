"""Session-wide real servers for the test suite.

* ``ray_cluster``: one real Ray head (`ray start --head --block`, dashboard and Jobs API on) per test
  session, shared by every test that needs Ray. An exclusive file lock serialises sessions on the
  host, because two Ray clusters on one host break Train's placement-group cleaner.
* ``ray_connected``: this process attached to that cluster with ``ray.init``.
* ``mlflow_server``: a real ``mlflow server`` (SQLite store, local artifacts) on a free port.

Both servers are started lazily, only by the tests that ask for them, and only the processes the
fixture started are stopped (never ``ray stop``, which would kill every Ray on the host).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from testkit import VENV_BIN, free_port, http_ok, wait_until
from testkit import stop_process_group as _stop_process_group

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
LOCK_PATH = Path(tempfile.gettempdir()) / "convtune-ray-tests.lock"


@dataclass
class RayCluster:
    gcs_address: str
    dashboard_url: str
    temp_dir: Path
    num_cpus: int
    env: dict


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray head with the dashboard and Jobs API, started once per session."""
    lock = open(LOCK_PATH, "w")  # noqa: SIM115 - held for the whole session
    fcntl.flock(lock, fcntl.LOCK_EX)
    temp_dir = Path(tempfile.mkdtemp(prefix="ctray-", dir="/tmp"))  # short: Ray's socket paths are limited
    gcs_port, dash_port = free_port(), free_port()
    num_cpus = int(os.environ.get("CONVTUNE_TEST_RAY_CPUS", "2"))
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        f"--port={gcs_port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
        f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = open(temp_dir / "ray-start.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard_url = f"http://127.0.0.1:{dash_port}"
    try:
        wait_until(lambda: proc.poll() is None and http_ok(f"{dashboard_url}/api/version"), 120,
                   f"the Ray dashboard at {dashboard_url} (log: {temp_dir / 'ray-start.log'})")
        gcs_address = _read_gcs_address(temp_dir) or f"127.0.0.1:{gcs_port}"
        # Train's placement-group cleaner finds the cluster through the State API, which reads the
        # default address file before scanning: point it at this cluster, not a stale earlier one.
        address_file = _default_address_file()
        address_file.parent.mkdir(parents=True, exist_ok=True)
        address_file.write_text(gcs_address)
        yield RayCluster(gcs_address, dashboard_url, temp_dir, num_cpus, env)
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
        # `ray start --block` stops its processes one by one, each with a grace period (20 s in all here);
        # the session's cluster and its temp dir go away, so 5 s of grace and then SIGKILL to its own group
        _stop_process_group(proc, grace=5.0)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _default_address_file() -> Path:
    from ray._private.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def _read_gcs_address(temp_dir: Path) -> str | None:
    """The address `ray start` recorded in its own temp dir (the node IP it chose, not loopback)."""
    from ray._private.utils import get_ray_address_file

    path = Path(get_ray_address_file(str(temp_dir)))
    return path.read_text().strip() if path.is_file() else None


@pytest.fixture(scope="session")
def ray_connected(ray_cluster):
    """This test process attached to the session cluster as a Ray driver."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.gcs_address, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                                           "RAY_ADDRESS": ray_cluster.gcs_address}})
    yield ray_cluster
    ray.shutdown()


@dataclass
class MlflowServer:
    url: str
    backend_uri: str
    artifacts_dir: Path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, proxied local artifacts)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    backend = f"sqlite:///{root / 'mlflow.db'}"
    cmd = [
        str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", backend,
        "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
        "--port", str(port), "--workers", "1",
    ]
    log = open(root / "mlflow.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is None and http_ok(f"{url}/health"), 120,
                   f"mlflow server at {url} (log: {root / 'mlflow.log'})")
        yield MlflowServer(url, backend, root / "artifacts")
    finally:
        _stop_process_group(proc)
        log.close()


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str

    def new_database(self, name: str) -> str:
        """A fresh, empty database on this server; its SQLAlchemy URL."""
        from sqlalchemy import create_engine, text

        admin = create_engine(f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/postgres",
                              isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{name}"


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (Debian's `postgresql` binaries) on a free loopback port, in a temp dir,
    started once per session and stopped by its own pid. As root it runs as the `postgres` user."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        why = "no PostgreSQL server binaries: install Debian's postgresql package (.ci/run does)"
        if os.environ.get("CONVTUNE_TEST_REQUIRE_POSTGRES"):  # CI: the PostgreSQL cases must run, not skip
            pytest.fail(why)
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="ctpg-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        shutil.chown(root, "postgres")
        as_user = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
    data, port, user = root / "data", free_port(), "convtune"
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", user, "--no-sync"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    log = open(root / "postgres.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([*as_user, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                             "-h", "127.0.0.1", "-k", str(root), "-F"],  # -F: no fsync, a test server
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = PostgresServer("127.0.0.1", port, user)
    try:
        wait_until(lambda: proc.poll() is None and server.new_database("convtune_ready"), 60,
                   f"PostgreSQL on port {port} (log: {root / 'postgres.log'})")
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """Each test using it runs on the embedded SQLite default and on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'convtune.db'}"
    return request.getfixturevalue("postgres_server").new_database(f"t_{abs(hash(request.node.nodeid)) % 10**12}")
