"""docker/compose.yaml without a Docker engine: the compose-spec schema, Compose's own `config`
(the PyPI Compose binary, and the docker CLI plugin where one is installed), and the wiring
between services (health-gated start order, volumes, GPU reservation, URLs that point at services)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from urllib.parse import urlparse

import jsonschema
import pytest
from docker_manifests import (
    COMPOSE_FILE,
    COMPOSE_TEST_ENV,
    SCHEMAS,
    compose,
    compose_environment,
    extract_compose_schema,
    tool,
)


def compose_commands() -> list[pytest.param]:
    plugin = shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0
    return [
        pytest.param([tool("docker-compose")], id="compose-wheel"),
        pytest.param(["docker", "compose"], id="docker-cli-plugin",
                     marks=pytest.mark.skipif(not plugin, reason="the docker CLI here has no compose plugin")),
    ]


def run_config(command: list[str], env_overrides: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_TEST_ENV}
    env.update(env_overrides)
    env["DOCKER_CONFIG"] = env.get("DOCKER_CONFIG", "/nonexistent-docker-config")  # no host contexts or creds
    return subprocess.run([*command, "-f", str(COMPOSE_FILE), "config", *extra],
                          capture_output=True, text=True, env=env, timeout=60)


def test_vendored_schema_is_the_one_compose_uses():
    vendored = json.loads((SCHEMAS / "compose-spec.json").read_text())
    assert vendored == extract_compose_schema(), "re-vendor it: see tests/docker/schemas/README.md"


def test_compose_file_matches_the_compose_spec_schema():
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(compose()), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_schema_rejects_a_misspelt_key():
    """The schema check bites: a typo in a service key is an error, not silently ignored."""
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    doc = compose()
    doc["services"]["api"]["healthchek"] = doc["services"]["api"].pop("healthcheck")
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(doc))


@pytest.mark.parametrize("command", compose_commands())
def test_compose_config_accepts_the_file(command):
    proc = run_config(command, COMPOSE_TEST_ENV, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)
    api_env = resolved["services"]["api"]["environment"]
    assert api_env["CONVTUNE_API_TOKENS"] == COMPOSE_TEST_ENV["CONVTUNE_API_TOKENS"]
    assert resolved["services"]["ray-worker"]["environment"]["RAY_AUTH_TOKEN"] == COMPOSE_TEST_ENV["RAY_AUTH_TOKEN"]


@pytest.mark.parametrize("command", compose_commands())
@pytest.mark.parametrize("missing", sorted(COMPOSE_TEST_ENV))
def test_compose_config_names_a_missing_secret(command, missing):
    env = {k: v for k, v in COMPOSE_TEST_ENV.items() if k != missing}
    proc = run_config(command, env, "--quiet")
    assert proc.returncode != 0
    assert missing in proc.stderr and ".env.example" in proc.stderr


def test_every_service_has_a_health_check_and_starts_after_healthy_dependencies():
    services = compose()["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in services
            assert cond.get("condition") == "service_healthy", f"{name} starts before {dep} is healthy"
    assert set(services["api"]["depends_on"]) == {"postgres", "mlflow", "ray-head"}
    assert "ray-head" in services["ray-worker"]["depends_on"]


def test_named_volumes_are_declared_and_used():
    doc = compose()
    declared = set(doc["volumes"])
    used = {mount.split(":", 1)[0] for s in doc["services"].values() for mount in s.get("volumes", [])
            if not mount.startswith((".", "/", "$"))}
    assert used == declared
    # stateful services keep their state on named volumes
    mounts = {name: [m.split(":")[1] for m in s.get("volumes", [])] for name, s in doc["services"].items()}
    assert "/var/lib/postgresql/data" in mounts["postgres"]
    assert "/data/mlartifacts" in mounts["mlflow"]
    assert "/data/ray_results" in mounts["ray-head"] and "/data/ray_results" in mounts["ray-worker"]


def test_gpu_worker_reserves_nvidia_gpus():
    services = compose()["services"]
    (device,) = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in services["ray-head"], "the head runs drivers only"
    assert "--num-gpus=0" in services["ray-head"]["command"]


def _flag(command: list[str], name: str) -> str:
    return next(arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}="))


def test_api_urls_point_at_the_services_that_serve_them():
    services = compose()["services"]
    env = compose_environment(services["api"])
    ray = urlparse(env["CONVTUNE_RAY_ADDRESS"])
    assert ray.hostname == "ray-head" and str(ray.port) == _flag(services["ray-head"]["command"], "dashboard-port")
    mlflow = urlparse(env["CONVTUNE_MLFLOW_TRACKING_URI"])
    assert mlflow.hostname == "mlflow" and str(mlflow.port) == _flag(services["mlflow"]["command"], "port")
    allowed = _flag(services["mlflow"]["command"], "allowed-hosts").split(",")
    assert any(re.fullmatch(p.replace("*", ".*"), f"{mlflow.hostname}:{mlflow.port}") for p in allowed), \
        "MLflow's host-header check would reject the API's and the trials' requests"
    db = urlparse(env["CONVTUNE_DATABASE_URL"].replace("${POSTGRES_PASSWORD:-convtune}", "pw"))
    assert db.hostname == "postgres" and db.path == "/" + services["postgres"]["environment"]["POSTGRES_DB"]
    backend = urlparse(_flag(services["mlflow"]["command"], "backend-store-uri").replace("${POSTGRES_PASSWORD:-convtune}", "pw"))
    assert backend.hostname == "postgres" and backend.path == "/" + services["postgres"]["environment"]["MLFLOW_DB"]
    # the API, head and workers agree on one Ray token, and the storage path is the shared volume
    ray_token = compose_environment(services["ray-head"])["RAY_AUTH_TOKEN"]
    assert env["CONVTUNE_RAY_AUTH_TOKEN"] == ray_token == compose_environment(services["ray-worker"])["RAY_AUTH_TOKEN"]
    assert any(v.startswith("ray-results:" + env["CONVTUNE_STORAGE_PATH"]) for v in services["ray-head"]["volumes"])


def test_api_health_check_hits_a_route_the_api_serves():
    from service.api.routes import health

    probe = " ".join(compose()["services"]["api"]["healthcheck"]["test"])
    path = re.search(r"http://127\.0\.0\.1:8000(/[\w/-]*)", probe).group(1)
    assert path in {route.path for route in health.router.routes}


def _help_flags(*command: str) -> set[str]:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", proc.stdout))


def test_container_commands_use_flags_the_installed_tools_accept():
    """`ray start` (compose, and KubeRay's rayStartParams) and `mlflow server` know every flag we pass,
    at the versions the images pin."""
    from docker_manifests import find_kind

    services = compose()["services"]
    ray_flags = _help_flags(tool("ray"), "start", "--help")
    mlflow_flags = _help_flags(tool("mlflow"), "server", "--help")
    used = {
        "ray": [a.split("=")[0] for s in ("ray-head", "ray-worker") for a in services[s]["command"] if a.startswith("--")],
        "mlflow": [a.split("=")[0] for a in services["mlflow"]["command"] if a.startswith("--")],
    }
    spec = find_kind("RayCluster")["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        used["ray"] += [f"--{key}" for key in group["rayStartParams"]]
    mlflow_k8s = find_kind("Deployment", "convtune-mlflow")["spec"]["template"]["spec"]["containers"][0]["command"]
    used["mlflow"] += [a.split("=")[0] for a in mlflow_k8s if a.startswith("--")]
    assert set(used["ray"]) - ray_flags == set()
    assert set(used["mlflow"]) - mlflow_flags == set()


def test_mlflow_server_with_the_compose_flags_accepts_in_stack_host_names(tmp_path):
    """Run the compose stack's `mlflow server` command (SQLite and a temp folder standing in for
    PostgreSQL and the volume): requests addressed to `mlflow:5000`, as the API and the trials send
    them, pass MLflow's host-header check, and foreign host names do not."""
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = {"--backend-store-uri": f"sqlite:///{tmp_path}/mlflow.db", "--artifacts-destination": str(tmp_path / "art"),
                 "--host": "127.0.0.1", "--port": str(port), "--workers": "1"}
    command = [tool("mlflow")] + [
        f"{a.split('=')[0]}={overrides[a.split('=')[0]]}" if a.split("=")[0] in overrides else a
        for a in compose()["services"]["mlflow"]["command"][1:]]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)

    def get(path: str, host: str) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            try:
                if get("/health", "localhost") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 90 s"
            time.sleep(0.5)
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert get(search, "mlflow:5000") == 200
        assert get(search, "attacker.example.com") in (400, 403)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
