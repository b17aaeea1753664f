"""Job control over Ray's Jobs API: one Ray job per sweep attempt, stopped with SIGINT so the
driver saves its state (Tune's graceful stop) before it exits."""

from __future__ import annotations

import os
import shlex
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from service.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class RayUnavailable(RuntimeError):
    """The Ray Jobs API cannot be reached (answers 503)."""


class JobNotFound(LookupError):
    pass


@dataclass(frozen=True)
class JobState:
    status: str  # Ray's JobStatus: PENDING RUNNING STOPPED SUCCEEDED FAILED
    message: str | None
    start_time: int | None = None
    end_time: int | None = None


def attempt_job_id(sweep_id: str, attempt: int) -> str:
    """The first attempt's submission id is the sweep id itself; resumes get a suffix."""
    return sweep_id if attempt <= 1 else f"{sweep_id}-resume-{attempt - 1}"


class JobControl:
    """A thin wrapper over ``JobSubmissionClient`` that turns its failures into typed errors."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._client = None
        self._lock = threading.Lock()

    # --- plumbing
    def _headers(self) -> dict[str, str] | None:
        token = self.settings.ray_auth_token
        return {"Authorization": f"Bearer {token.get_secret_value()}"} if token else None

    def client(self):
        from ray.job_submission import JobSubmissionClient

        with self._lock:
            if self._client is None:
                try:
                    self._client = JobSubmissionClient(self.settings.ray_address, headers=self._headers())
                except (ConnectionError, RuntimeError, OSError) as exc:
                    raise RayUnavailable(
                        f"Ray's Jobs API at {self.settings.ray_address} is unreachable ({exc}); "
                        "start the stack with `convtune up` or fix CONVTUNE_RAY_ADDRESS") from exc
            return self._client

    def _call(self, fn, *args, **kwargs):
        import requests

        client = self.client()
        try:
            return getattr(client, fn)(*args, **kwargs)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError) as exc:
            with self._lock:
                self._client = None
            raise RayUnavailable(f"Ray's Jobs API at {self.settings.ray_address} is unreachable: {exc}") from exc
        except RuntimeError as exc:
            text = str(exc)
            if "status code 404" in text or "does not exist" in text:
                raise JobNotFound(args[0] if args else "") from exc
            raise

    def ping(self) -> str:
        """Ray's version, or RayUnavailable."""
        self.client()
        try:
            import requests

            resp = requests.get(f"{self.settings.ray_address}/api/version", timeout=3, headers=self._headers())
            resp.raise_for_status()
            return resp.json()["ray_version"]
        except Exception as exc:
            with self._lock:
                self._client = None
            raise RayUnavailable(f"Ray's Jobs API at {self.settings.ray_address} is unreachable: {exc}") from exc

    # --- job control
    def runtime_env(self, working_dir: Path) -> dict:
        env = {
            "RAY_JOB_STOP_SIGNAL": "SIGINT",  # Tune's SIGINT handler saves the experiment state
            "RAY_JOB_STOP_WAIT_TIME_S": str(self.settings.job_stop_wait_s),
            "RAY_AUTH_MODE": "token" if self.settings.ray_auth_token else "disabled",
            "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "MLFLOW_TRACKING_URI": self.settings.mlflow_tracking_uri,
            "CONVTUNE_DATA_ROOTS": ",".join(str(p) for p in self.settings.data_roots),  # checked again there
            "PYTHONUNBUFFERED": "1",
            # the driver's ray.init adds its own runtime_env (worker env vars, setup hook): merge, don't fail
            "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
        }
        for name in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"):
            if name in os.environ:
                env[name] = os.environ[name]
        # the spec travels as the job's working_dir package, so the API needs no shared disk with Ray
        return {"working_dir": str(working_dir), "env_vars": env}

    def entrypoint(self, sweep_id: str, resume: bool) -> str:
        args = [self.settings.job_python, "-m", "search_spaces.driver", "--spec", "spec.json",
                "--sweep-id", sweep_id, "--storage-path", self.settings.storage_path,
                "--mlflow-uri", self.settings.mlflow_tracking_uri]
        if resume:
            args.append("--resume")
        return shlex.join(args)

    def submit(self, *, job_id: str, sweep_id: str, spec_json: str, resume: bool, metadata: dict) -> str:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="convtune-job-") as tmp:
            (Path(tmp) / "spec.json").write_text(spec_json)
            try:
                return self._call("submit_job", entrypoint=self.entrypoint(sweep_id, resume),
                                  submission_id=job_id, runtime_env=self.runtime_env(Path(tmp)),
                                  metadata={k: str(v) for k, v in metadata.items()},
                                  entrypoint_num_cpus=0)
            except RuntimeError as exc:
                if "already exists" in str(exc):
                    return job_id  # an earlier attempt got through: the submission id is the idempotency key
                raise

    def state(self, job_id: str) -> JobState:
        info = self._call("get_job_info", job_id)
        status = getattr(info.status, "value", str(info.status))
        return JobState(status=str(status), message=info.message, start_time=info.start_time,
                        end_time=info.end_time)

    def stop(self, job_id: str) -> bool:
        return bool(self._call("stop_job", job_id))

    def logs(self, job_id: str) -> str:
        return self._call("get_job_logs", job_id)

    async def follow(self, job_id: str) -> AsyncIterator[str]:
        client = self.client()
        try:
            async for chunk in client.tail_job_logs(job_id):
                yield chunk
        except (ConnectionError, OSError) as exc:
            raise RayUnavailable(f"lost the log stream from Ray: {exc}") from exc

    def placement_groups_created(self) -> int:
        """How many placement groups are alive (for health: leaked groups starve new trials)."""
        import requests

        resp = requests.get(f"{self.settings.ray_address}/api/v0/placement_groups",
                            params={"limit": 1000}, timeout=5, headers=self._headers())
        resp.raise_for_status()
        rows = resp.json().get("data", {}).get("result", {}).get("result", [])
        return sum(1 for row in rows if row.get("state") == "CREATED")

    def cluster_resources(self) -> tuple[dict[str, float], list[dict[str, float]]] | None:
        """(totals, per-node resources) of the live nodes, e.g. ({"CPU": 8, "GPU": 2}, [...]); None if unknown."""
        import requests

        try:
            resp = requests.get(f"{self.settings.ray_address}/nodes", params={"view": "summary"},
                                timeout=5, headers=self._headers())
            resp.raise_for_status()
        except Exception:
            return None
        nodes = []
        for node in resp.json().get("data", {}).get("summary", []):
            raylet = node.get("raylet") or {}
            if raylet.get("state", "ALIVE") == "ALIVE":
                nodes.append({k: float(v) for k, v in (raylet.get("resourcesTotal") or {}).items()
                              if k in ("CPU", "GPU")})
        if not nodes:
            return None
        totals = {key: sum(n.get(key, 0.0) for n in nodes) for key in ("CPU", "GPU")}
        return totals, nodes
