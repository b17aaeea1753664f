"""API logic against the real Ray head, real MLflow server and a real SQLite file (no training)."""

from __future__ import annotations

import json
import uuid

import pytest
import yaml

from service.models import Sweep, SweepStatus, utcnow

pytestmark = pytest.mark.ray

READ, SUBMIT = "reader-token-0001-padded-to-32-chars", "submitter-token-01-padded-to-32-chr"
TOKENS = f"{READ}:read,{SUBMIT}:read+submit"


def test_health_needs_no_token_and_readyz_checks_everything(make_client):
    client = make_client(api_tokens=TOKENS)
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["components"]) == {"database", "ray", "mlflow"}


def test_auth_401_without_or_with_a_wrong_token_and_403_without_the_scope(make_client, tiny_spec):
    client = make_client(api_tokens=TOKENS)
    client.headers.pop("Authorization", None)
    missing = client.get("/v1/sweeps")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/sweeps", headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    assert client.get("/v1/sweeps", headers={"Authorization": f"Bearer {READ}"}).status_code == 200
    forbidden = client.post("/v1/sweeps/validate", json=tiny_spec, headers={"Authorization": f"Bearer {READ}"})
    assert forbidden.status_code == 403 and "submit" in forbidden.json()["detail"]
    ok = client.post("/v1/sweeps/validate", json=tiny_spec, headers={"Authorization": f"Bearer {SUBMIT}"})
    assert ok.status_code == 200, ok.text


def test_validate_is_a_dry_run_against_the_live_cluster(make_client, tiny_spec, ray_cluster):
    client = make_client()
    report = client.post("/v1/sweeps/validate", content=yaml.safe_dump(tiny_spec),
                         headers={"Content-Type": "application/yaml"}).json()
    assert report["trials"] == 2 and report["cluster"]["CPU"] == ray_cluster.num_cpus
    assert len(report["samples"]) >= 2 and not report["problems"]
    assert client.get("/v1/sweeps").json()["total"] == 0  # nothing submitted


@pytest.mark.parametrize("mutate, field", [
    (lambda s: s["base"].update(model="resnet50"), "base"),
    (lambda s: s["base"].update(optimizer="evil_opt"), "base"),
    (lambda s: s["base"].update(schedule="warp_speed"), "base"),
    (lambda s: s["base"].update(dataset="imagenet_from_the_web"), "base"),
    (lambda s: s["space"].update(blr={"type": "loguniform", "low": 1e-2, "high": 1e-3}), "space.blr"),
    (lambda s: s.update(num_samples=0), "num_samples"),
    (lambda s: s.update(unknown_key=1), "unknown_key"),
    (lambda s: s["resources"].update(cpus_per_worker=64), "resources.cpus_per_worker"),
])
def test_invalid_specs_get_422_naming_the_field_and_nothing_is_created(make_client, tiny_spec, mutate, field):
    client = make_client()
    mutate(tiny_spec)
    resp = client.post("/v1/sweeps", json=tiny_spec)
    assert resp.status_code == 422, resp.text
    errors = resp.json()["errors"]
    assert errors and any(e["field"].startswith(field) for e in errors), errors
    assert all(e["reason"] for e in errors)
    assert client.get("/v1/sweeps").json()["total"] == 0


@pytest.mark.parametrize("body, content_type, field", [
    (b"{not json", "application/json", "body"),
    (b"- a\n- list\n", "application/yaml", "body"),
    (b"!!python/object/apply:os.system ['echo owned']\n", "application/yaml", "body"),
    (b"", "application/json", "body"),
])
def test_bodies_that_are_not_a_spec_mapping_get_422(make_client, body, content_type, field):
    resp = make_client().post("/v1/sweeps", content=body, headers={"Content-Type": content_type})
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"][0]["field"] == field


def test_data_paths_must_stay_inside_the_allowed_roots(make_client, tiny_spec, tmp_path):
    root = tmp_path / "data-root"
    (root / "images" / "train").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    client = make_client(data_roots=str(root))
    tiny_spec["base"].update(dataset="imagefolder")

    def errors_for(data_root):
        spec = json.loads(json.dumps(tiny_spec))
        spec["base"]["data_root"] = data_root
        resp = client.post("/v1/sweeps/validate", json=spec)
        return resp.status_code, resp.json().get("errors", [])

    for bad, reason in [(f"{root}/images/../../secret", "'..'"), (str(outside), "outside"),
                        (f"{root}/escape", "outside"), ("images", "absolute"), ("s3://bucket/x", "local")]:
        status, errors = errors_for(bad)
        assert status == 422 and errors[0]["field"] == "base.data_root", (bad, errors)
        assert reason in errors[0]["reason"], (bad, errors)
    # a searched path is checked too
    spec = json.loads(json.dumps(tiny_spec))
    spec["space"]["checkpoint"] = {"type": "choice", "values": [str(outside / "ckpt.pth")]}
    resp = client.post("/v1/sweeps/validate", json=spec)
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "space.checkpoint.values.0"


def test_oversized_bodies_get_413(make_client, tiny_spec):
    client = make_client(max_body_bytes=4096)
    tiny_spec["description"] = "x" * 10_000
    resp = client.post("/v1/sweeps", json=tiny_spec)
    assert resp.status_code == 413
    chunked = client.post("/v1/sweeps", content=iter([b"{", b" " * 5000, b"}"]),
                          headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413


def test_ray_down_gives_503_and_creates_nothing(make_client, tiny_spec, helpers):
    dead = f"http://127.0.0.1:{helpers.free_port()}"
    client = make_client(ray_address=dead)
    resp = client.post("/v1/sweeps", json=tiny_spec, headers={"Idempotency-Key": "k1"})
    assert resp.status_code == 503 and "Ray" in resp.json()["detail"]
    assert client.get("/v1/sweeps").json()["total"] == 0
    ready = client.get("/readyz")
    assert ready.status_code == 503 and not ready.json()["components"]["ray"]["ok"]


def test_mlflow_down_gives_503_and_creates_nothing(make_client, tiny_spec, helpers, ray_cluster):
    from ray.job_submission import JobSubmissionClient

    jobs_before = len(JobSubmissionClient(ray_cluster.dashboard_url).list_jobs())
    client = make_client(mlflow_tracking_uri=f"http://127.0.0.1:{helpers.free_port()}")
    resp = client.post("/v1/sweeps", json=tiny_spec)
    assert resp.status_code == 503 and "MLflow" in resp.json()["detail"]
    assert client.get("/v1/sweeps").json()["total"] == 0
    assert len(JobSubmissionClient(ray_cluster.dashboard_url).list_jobs()) == jobs_before


def _store(client, n: int, status: SweepStatus):
    db = client.app.state.db
    with db.session() as s:
        for i in range(n):
            s.add(Sweep(id=f"sw-{uuid.uuid4().hex[:12]}", name=f"s{i}", status=status,
                        spec_json='{"name": "s"}', spec_hash="h", ray_job_id=f"j{status}{i}",
                        finished_at=utcnow()))
        s.commit()


def test_list_filters_by_status_and_pages(make_client):
    client = make_client()
    _store(client, 5, SweepStatus.SUCCEEDED)
    _store(client, 3, SweepStatus.FAILED)
    page = client.get("/v1/sweeps", params={"limit": 2}).json()
    assert page["total"] == 8 and len(page["items"]) == 2 and page["next_offset"] == 2
    ids = []
    offset = 0
    while offset is not None:
        page = client.get("/v1/sweeps", params={"limit": 3, "offset": offset}).json()
        ids += [s["id"] for s in page["items"]]
        offset = page["next_offset"]
    assert len(ids) == len(set(ids)) == 8
    failed = client.get("/v1/sweeps", params={"status": "FAILED"}).json()
    assert failed["total"] == 3 and {s["status"] for s in failed["items"]} == {"FAILED"}
    both = client.get("/v1/sweeps", params=[("status", "FAILED"), ("status", "SUCCEEDED")]).json()
    assert both["total"] == 8
    bad = client.get("/v1/sweeps", params={"status": "DANCING"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"].startswith("query.status")


def test_unknown_sweeps_404_and_terminal_sweeps_cannot_be_cancelled(make_client):
    client = make_client()
    assert client.get("/v1/sweeps/sw-000000000000").status_code == 404
    _store(client, 1, SweepStatus.SUCCEEDED)
    sweep_id = client.get("/v1/sweeps").json()["items"][0]["id"]
    resp = client.post(f"/v1/sweeps/{sweep_id}/cancel", headers={"Content-Type": "application/json"})
    assert resp.status_code == 409 and "SUCCEEDED" in resp.json()["detail"]
    assert client.post(f"/v1/sweeps/{sweep_id}/resume", headers={"Content-Type": "application/json"}).status_code == 409


def test_presets_are_listed_with_their_specs(make_client):
    presets = make_client().get("/v1/search-spaces").json()
    names = {p["name"] for p in presets}
    assert "quickstart" in names
    quick = next(p for p in presets if p["name"] == "quickstart")
    assert quick["spec"]["space"] and quick["spec"]["metric"] == "val_top1"


def test_openapi_documents_the_spec_schema(make_client):
    schema = make_client().get("/openapi.json").json()
    body = schema["paths"]["/v1/sweeps"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["$ref"] == "#/components/schemas/SweepSpec"
    assert "application/yaml" in body
    assert "space" in schema["components"]["schemas"]["SweepSpec"]["properties"]
