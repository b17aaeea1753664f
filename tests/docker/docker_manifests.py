"""Readers for docker/: Dockerfiles, the compose file, the KubeRay manifests, and the tools that check
them without a Docker engine (hadolint, Compose and kubernetes-validate from their PyPI wheels)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
KUBERAY = DOCKER / "kuberay"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
DOCKERFILES = {"worker": DOCKER / "worker.Dockerfile", "service": DOCKER / "service.Dockerfile"}
COMPOSE_FILE = DOCKER / "compose.yaml"
# what `docker compose config` needs in the environment (the two required secrets)
COMPOSE_TEST_ENV = {"RAY_AUTH_TOKEN": "test-ray-token-0123456789", "CONVTUNE_API_TOKENS": "test-api-token-padded-to-32-chars:read+submit"}


def tool(name: str) -> str:
    """A console script installed by the test extra: next to this interpreter first, then on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install the test extra (pip install -e '.[test]')")
    return found


# ---------- Dockerfiles ----------

@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)


def dockerfile_stages(path: Path) -> list[Stage]:
    """Split a Dockerfile into stages of (instruction, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            parts = args.split()
            parts = [p for p in parts if not p.startswith("--")]
            name = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else None
            stages.append(Stage(base=parts[0], name=name))
        elif stages:
            stages[-1].instructions.append((instr, args.strip()))
    return stages


def dockerfile_env_names(path: Path) -> set[str]:
    """Variable names that ENV instructions set (any stage)."""
    names: set[str] = set()
    for stage in dockerfile_stages(path):
        for instr, args in stage.instructions:
            if instr == "ENV":
                names.update(token.split("=", 1)[0] for token in shlex.split(args) if "=" in token)
    return names


def dockerfile_env(path: Path) -> dict[str, str]:
    """ENV values of the final stage."""
    env: dict[str, str] = {}
    for instr, args in dockerfile_stages(path)[-1].instructions:
        if instr == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(args) if "=" in token)
    return env


# ---------- compose ----------

def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def extract_compose_schema(binary: str | None = None) -> dict:
    """The compose-spec JSON Schema that the Compose binary embeds (it validates files against it)."""
    data = Path(binary or tool("docker-compose")).read_bytes()
    at = data.find(b'"$id": "compose_spec.json"')
    if at < 0:
        raise LookupError("no compose_spec.json schema embedded in the Compose binary")
    start = data.rfind(b"{", 0, at)
    schema, _ = json.JSONDecoder().raw_decode(data[start:start + 4_000_000].decode("utf-8", "replace"))
    return schema


# ---------- Kubernetes ----------

def kuberay_documents() -> list[tuple[Path, dict]]:
    """Every manifest document under docker/kuberay/, except the kustomization."""
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def find_kind(kind: str, name: str | None = None) -> dict:
    hits = [d for _, d in kuberay_documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def pod_specs(doc: dict) -> list[dict]:
    """Pod specs inside a workload or RayCluster."""
    if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "RayCluster":
        groups = [doc["spec"]["headGroupSpec"], *doc["spec"].get("workerGroupSpecs", [])]
        return [g["template"]["spec"] for g in groups]
    return []


def strict_schema(schema: dict) -> dict:
    """A copy of an OpenAPI v3 structural schema that rejects unknown fields, as the API server's
    strict field validation does (objects with listed properties and no preserve-unknown flag)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def raycluster_schema() -> dict:
    return strict_schema(json.loads((SCHEMAS / "kuberay-1.7.0-raycluster-v1.json").read_text()))


if __name__ == "__main__":  # re-vendor the compose schema: see schemas/README.md
    if sys.argv[1:] == ["extract-compose-schema"]:
        print(json.dumps(extract_compose_schema(), indent=2))
    else:
        sys.exit("usage: docker_manifests.py extract-compose-schema")
