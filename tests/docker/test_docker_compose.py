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
