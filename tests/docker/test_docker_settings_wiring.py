"""The settings the images, the compose stack and the KubeRay manifests set are exactly settings the
service reads (`service.settings.Settings`, prefix CONVTUNE_), the API containers set everything
a cluster deployment needs, and the values parse. Also: the service side never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from docker_manifests import (
    COMPOSE_TEST_ENV,
    DOCKERFILES,
    ROOT,
    compose,
    compose_environment,
    dockerfile_env,
    dockerfile_env_names,
    find_kind,
    kuberay_documents,
    pod_specs,
)

from service.settings import Settings

PREFIX = Settings.model_config["env_prefix"]
# what an API on a cluster must be told; the rest have sensible defaults
REQUIRED_ON_A_CLUSTER = {"ray_address", "ray_auth_token", "mlflow_tracking_uri", "database_url",
                         "storage_path", "api_tokens", "host"}


def settings_env_names() -> set[str]:
    names = set()
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else None
        names.add((alias or f"{PREFIX}{name}").upper())
    return names


def set_names() -> dict[str, set[str]]:
    """Every CONVTUNE_* variable each place sets, by where it is set."""
    found: dict[str, set[str]] = {}
    for image, path in DOCKERFILES.items():
        found[f"{image}.Dockerfile"] = dockerfile_env_names(path)
    for name, service in compose()["services"].items():
        found[f"compose:{name}"] = set(compose_environment(service))
    for path, doc in kuberay_documents():
        for pod in pod_specs(doc):
            for container in pod["containers"]:
                names = {e["name"] for e in container.get("env", [])}
                names |= {e["name"] for e in doc.get("spec", {}).get("autoscalerOptions", {}).get("env", [])}
                found[f"{path.name}:{doc['metadata']['name']}/{container['name']}"] = names
    return {where: {n for n in names if n.startswith(PREFIX)} for where, names in found.items()}


def test_settings_reads_the_prefix_the_deployments_use():
    assert PREFIX == "CONVTUNE_"
    assert "CONVTUNE_RAY_ADDRESS" in settings_env_names()


def test_every_convtune_variable_set_anywhere_is_a_setting():
    known = settings_env_names()
    unknown = {where: sorted(names - known) for where, names in set_names().items() if names - known}
    assert not unknown, f"set but never read by service.settings.Settings: {unknown}"


@pytest.mark.parametrize("where", ["compose:api", "service.yaml:convtune-api/api"])
def test_api_containers_set_what_a_cluster_needs(where):
    needed = {f"{PREFIX}{name}".upper() for name in REQUIRED_ON_A_CLUSTER}
    assert needed <= set_names()[where], f"{where} misses {sorted(needed - set_names()[where])}"


def _parse(env: dict[str, str], monkeypatch) -> Settings:
    for key in list(os.environ):
        if key.startswith(PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT / "docker")  # no stray .env
    settings = Settings()
    settings.check_bind()
    return settings


def test_compose_api_environment_parses(monkeypatch):
    """The API container's environment, as `docker compose config` resolves it, is valid Settings."""
    from docker_manifests import COMPOSE_FILE, tool

    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_TEST_ENV}
    env.update(COMPOSE_TEST_ENV)
    proc = subprocess.run([tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "--format", "json"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)["services"]["api"]["environment"]
    api_env = {**dockerfile_env(DOCKERFILES["service"]), **resolved}
    settings = _parse({k: v for k, v in api_env.items() if k.startswith(PREFIX)}, monkeypatch)
    assert settings.ray_address == "http://ray-head:8265"
    assert settings.auth_enabled and settings.ray_auth_token.get_secret_value() == COMPOSE_TEST_ENV["RAY_AUTH_TOKEN"]
    assert settings.database_url.startswith("postgresql://") and settings.storage_path == "/data/ray_results"
    assert [str(p) for p in settings.data_roots] == ["/datasets"]
    assert settings.job_python == "/opt/venv/bin/python"


def test_kuberay_api_environment_parses(monkeypatch):
    container = find_kind("Deployment", "convtune-api")["spec"]["template"]["spec"]["containers"][0]
    env = {**dockerfile_env(DOCKERFILES["service"])}
    for e in container["env"]:
        # secrets get stand-in values of the documented form
        env[e["name"]] = e.get("value") or {"CONVTUNE_API_TOKENS": "a-long-secret-of-at-least-32-chars:read+submit"}.get(
            e["name"], "postgresql://convtune:pw@convtune-postgres:5432/convtune"
            if e["name"] == "CONVTUNE_DATABASE_URL" else "a-ray-token")
    settings = _parse({k: v for k, v in env.items() if k.startswith(PREFIX)}, monkeypatch)
    assert settings.ray_address == "http://convtune-head-svc:8265" and settings.auth_enabled


def test_job_python_is_the_head_image_interpreter():
    """The API tells the head which interpreter runs the sweep driver: the worker image's venv."""
    worker_env = dockerfile_env(DOCKERFILES["worker"])
    venv_bin = worker_env["VIRTUAL_ENV"] + "/bin"
    assert worker_env["PATH"].startswith(venv_bin)
    api = compose_environment(compose()["services"]["api"])
    assert api["CONVTUNE_JOB_PYTHON"] == venv_bin + "/python"


NO_TORCH_PROBE = """
import sys, json, contextlib, io
what = sys.argv[1]
if what == "app":
    import service.app
else:
    from service.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(["--help"])
        except SystemExit:
            pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "torchvision", "timm"})
print(json.dumps(heavy))
"""


@pytest.mark.parametrize("what", ["app", "cli-help"])
def test_service_side_never_imports_torch(what):
    """The service image has no torch: `import service.app` and `convtune --help` must not need it."""
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_PROBE, what], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert heavy == [], f"{what} imports {heavy[:8]}: move those imports into the handlers that need them"
