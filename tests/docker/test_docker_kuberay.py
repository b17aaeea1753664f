"""docker/kuberay/ without a cluster: built-in kinds against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict), the RayCluster against KubeRay's CRD schema (made strict), and the
wiring between the API, MLflow, the RayCluster, the claims, the secrets and the guide."""

from __future__ import annotations

import copy
import re
import tomllib
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml
from docker_manifests import KUBERAY, ROOT, find_kind, kuberay_documents, pod_specs, raycluster_schema

K8S_VERSIONS = ["1.30.0", "1.37.0"]  # oldest and newest we claim to support
BUILTIN = [(path, doc) for path, doc in kuberay_documents() if doc["kind"] != "RayCluster"]
GUIDE = ROOT / "docs" / "gpu_cluster.md"


def _id(item) -> str:
    path, doc = item
    return f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("item", BUILTIN, ids=[_id(i) for i in BUILTIN])
def test_builtin_resources_validate_strictly(item, version):
    _, doc = item
    kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field():
    doc = copy.deepcopy(find_kind("Deployment", "convtune-api"))
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, "1.37.0", strict=True)


def test_raycluster_matches_the_kuberay_crd_schema():
    cluster = find_kind("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    errors = list(jsonschema.Draft7Validator(raycluster_schema()).iter_errors(cluster))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_crd_schema_check_rejects_a_misspelt_field():
    cluster = copy.deepcopy(find_kind("RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert list(jsonschema.Draft7Validator(raycluster_schema()).iter_errors(cluster))


@pytest.mark.parametrize("group", ["head", "gpu"])
def test_raycluster_pod_templates_are_valid_pod_templates(group):
    """The CRD's copy of the pod schema may lag Kubernetes: check the templates against the real one."""
    spec = find_kind("RayCluster")["spec"]
    groups = {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}
    template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group},
                "template": groups[group]["template"]}
    kubernetes_validate.validate(template, "1.37.0", strict=True)


def test_raycluster_autoscales_a_gpu_group_on_the_project_ray_version():
    spec = find_kind("RayCluster")["spec"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ray_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    assert spec["rayVersion"] == ray_pin.split("==")[1]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] > gpu["minReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


def test_every_pod_runs_non_root_with_our_images():
    images = {}
    for _, doc in kuberay_documents():
        for pod in pod_specs(doc):
            assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
            for container in pod["containers"]:
                images[f"{doc['metadata']['name']}/{container['name']}"] = container["image"]
    assert images["convtune/ray-head"] == images["convtune/ray-worker"] == "convtune-worker"
    assert images["convtune-api/api"] == images["convtune-mlflow/mlflow"] == "convtune-service"
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    ours = {image["name"] for image in kustomization["images"]}
    assert {i for i in images.values() if i.startswith("convtune")} <= ours


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    on_disk = {p.name for p in KUBERAY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_api_points_at_the_ray_head_mlflow_and_shared_storage():
    cluster = find_kind("RayCluster")
    api = find_kind("Deployment", "convtune-api")["spec"]["template"]["spec"]
    env = _env(api["containers"][0])
    ray = urlparse(env["CONVTUNE_RAY_ADDRESS"]["value"])
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert ray.hostname == f"{cluster['metadata']['name']}-head-svc"  # the Service KubeRay creates
    assert ray.port in {p["containerPort"] for p in head["ports"] if p["name"] == "dashboard"}
    mlflow_svc = find_kind("Service", "convtune-mlflow")
    mlflow = urlparse(env["CONVTUNE_MLFLOW_TRACKING_URI"]["value"])
    assert mlflow.hostname == mlflow_svc["metadata"]["name"] and mlflow.port == mlflow_svc["spec"]["ports"][0]["port"]
    allowed = _env(find_kind("Deployment", "convtune-mlflow")["spec"]["template"]["spec"]["containers"][0])
    patterns = allowed["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert any(re.fullmatch(p.replace("*", ".*"), f"{mlflow.hostname}:{mlflow.port}") for p in patterns)
    # the token the API sends is the RayCluster's token secret
    token_ref = env["CONVTUNE_RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token_ref == {"name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}
    # the storage path is on the claim every Ray pod mounts
    storage = env["CONVTUNE_STORAGE_PATH"]["value"]
    for pod in pod_specs(cluster):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims[mounts[storage]] == "convtune-results"
    assert find_kind("PersistentVolumeClaim", "convtune-results")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_claims_config_maps_and_probes_resolve():
    claims = {d["metadata"]["name"] for _, d in kuberay_documents() if d["kind"] == "PersistentVolumeClaim"}
    config_maps = {d["metadata"]["name"] for _, d in kuberay_documents() if d["kind"] == "ConfigMap"}
    for _, doc in kuberay_documents():
        for pod in pod_specs(doc):
            for volume in pod.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps
    from service.api.routes import health

    served = {route.path for route in health.router.routes}
    api = find_kind("Deployment", "convtune-api")["spec"]["template"]["spec"]["containers"][0]
    assert {api["readinessProbe"]["httpGet"]["path"], api["livenessProbe"]["httpGet"]["path"]} <= served


def test_guide_creates_every_secret_the_manifests_reference():
    """docs/gpu_cluster.md's `kubectl create secret` lines give exactly the secrets and keys used."""
    referenced: set[tuple[str, str]] = set()
    for _, doc in kuberay_documents():
        for pod in pod_specs(doc):
            for container in pod["containers"]:
                for e in container.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        referenced.add((ref["name"], ref["key"]))
    cluster = find_kind("RayCluster")
    referenced.add((cluster["spec"]["authOptions"]["secretName"], "auth_token"))
    created: set[tuple[str, str]] = set()
    text = GUIDE.read_text().replace("\\\n", " ")
    for line in re.findall(r"kubectl -n convtune create secret generic .*", text):
        name = line.split()[6]
        created.update((name, key) for key in re.findall(r"--from-literal=([\w.-]+)=", line))
    assert referenced == created
