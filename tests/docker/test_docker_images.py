"""The two Dockerfiles, checked without a Docker engine: hadolint, non-root users, pinned bases and
dependency locks, build contexts, and the commands the images run."""

from __future__ import annotations

import fnmatch
import json
import subprocess
import tomllib

import pytest
from docker_manifests import DOCKER, DOCKERFILES, ROOT, compose, dockerfile_stages, tool
from packaging.requirements import Requirement

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKS = {"service": DOCKER / "requirements-service.txt", "worker": DOCKER / "requirements-worker.txt"}
LOCK_EXTRAS = {"service": ["postgres"], "worker": ["train", "postgres"]}
GPU_ONLY = {"torch", "torchvision", "timm", "triton"}


def hadolint(path) -> list[dict]:
    proc = subprocess.run([tool("hadolint"), "--no-color", "--format", "json", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip(), f"hadolint printed nothing: {proc.stderr}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(image):
    findings = hadolint(DOCKERFILES[image])
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_hadolint_flags_an_unpinned_root_image(tmp_path):
    """The linter really runs our rules: the faults the images avoid are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nCMD python app.py\n")
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3006", "DL3013", "DL3025"} <= codes


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_final_stage_runs_as_a_numeric_non_root_user(image):
    final = dockerfile_stages(DOCKERFILES[image])[-1]
    users = [args for instr, args in final.instructions if instr == "USER"]
    assert users, f"{image}: the final stage never leaves root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{image}: USER {users[-1]} (Kubernetes runAsNonRoot needs a numeric uid)"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_base_images_are_pinned(image):
    text = DOCKERFILES[image].read_text()
    args = dict(line.split(" ", 1)[1].split("=", 1) for line in text.splitlines() if line.startswith("ARG ") and "=" in line)
    stage_names = {s.name for s in dockerfile_stages(DOCKERFILES[image]) if s.name}
    for stage in dockerfile_stages(DOCKERFILES[image]):
        base = stage.base
        if base.startswith("${"):
            base = args[base.strip("${}")]
        if base in stage_names:
            continue
        name, _, tag = base.rpartition(":")
        assert name and tag and tag != "latest" and any(c.isdigit() for c in tag), f"{image}: unpinned base {base}"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_is_multi_stage_and_installs_the_pinned_lock(image):
    stages = dockerfile_stages(DOCKERFILES[image])
    assert len(stages) >= 2, "build tools and caches should stay in a build stage"
    runs = " ".join(args for s in stages for instr, args in s.instructions if instr == "RUN")
    copies = [args for s in stages for instr, args in s.instructions if instr == "COPY"]
    assert any(f"docker/requirements-{image}.txt" in c for c in copies)
    assert "--requirement" in runs and "--no-deps ." in runs, "deps from the lock, then the project without deps"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_build_context_allow_list_covers_every_copy(image):
    """BuildKit's <Dockerfile>.dockerignore: ignore everything, re-include exactly what COPY needs."""
    ignore = DOCKERFILES[image].with_name(DOCKERFILES[image].name + ".dockerignore")
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "start from an empty context"
    included = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    copies = [args.split() for s in dockerfile_stages(DOCKERFILES[image]) for instr, args in s.instructions
              if instr == "COPY" and not args.startswith("--from")]
    for parts in copies:
        for src in parts[:-1]:
            assert any(fnmatch.fnmatch(src.rstrip("/"), pat) for pat in included), f"{src} is not in the build context"
    for secret_or_heavy in (".venv", ".env", ".git", "mlruns"):
        assert not any(fnmatch.fnmatch(secret_or_heavy, pat) for pat in included)


def _lock(image) -> dict[str, str]:
    pins = {}
    for line in LOCKS[image].read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: locks pin exact versions"
            pins[req.name.lower().replace("_", "-")] = spec.version
    return pins


@pytest.mark.parametrize("image", sorted(LOCKS))
def test_lock_satisfies_pyproject(image):
    """Every dependency pyproject.toml declares for the image is pinned, inside its range. When this
    fails after a dependency change, regenerate the lock with the command in its header."""
    pins = _lock(image)
    wanted = list(PYPROJECT["project"]["dependencies"])
    for extra in LOCK_EXTRAS[image]:
        wanted += PYPROJECT["project"]["optional-dependencies"][extra]
    for line in wanted:
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is missing from {LOCKS[image].name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req.specifier}"


def test_service_lock_has_no_torch_or_cuda():
    pins = _lock("service")
    leaked = {name for name in pins if name in GPU_ONLY or name.startswith("nvidia-")}
    assert not leaked, f"the service image would install {sorted(leaked)}"
    assert {"torch", "timm"} <= set(_lock("worker"))


def test_images_run_the_convtune_commands():
    """Same code paths as the local stack: `convtune serve`, `ray start`, `mlflow server`."""
    final = dockerfile_stages(DOCKERFILES["service"])[-1]
    cmd = [args for instr, args in final.instructions if instr == "CMD"][-1]
    assert json.loads(cmd) == ["convtune", "serve"]
    assert PYPROJECT["project"]["scripts"]["convtune"] == "service.cli:main"
    services = compose()["services"]
    assert services["api"]["command"] == ["convtune", "serve"]
    assert services["ray-head"]["command"][:3] == ["ray", "start", "--head"]
    assert services["ray-worker"]["command"][:2] == ["ray", "start"]
    assert services["mlflow"]["command"][:2] == ["mlflow", "server"]
