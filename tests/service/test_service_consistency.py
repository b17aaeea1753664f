"""Consistent state under races and failures (issue 11 item 4), and owner-scoped Idempotency-Keys and HMAC
owner names (item 6), over real HTTP. Rows a concurrent request would be holding (a submit in flight) are
written into the API's own database, which is what that request leaves there at that moment."""

from __future__ import annotations

import contextlib
import json
import threading
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import update

SECRET = "consistency-test-secret-key-0123456789"
SPEC = {"name": "race", "base": {"model": "convnextv2_atto", "dataset": "digits", "input_size": 32, "epochs": 1,
                                 "steps_per_epoch_limit": 1, "batch_size": 32, "warmup_epochs": 0},
        "space": {"blr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
        "search": {"algorithm": "random", "seed": 0}, "scheduler": {"type": "fifo"}, "num_samples": 1,
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
        "failures": {"trial_retries": 0, "worker_retries": 0}}
JSON = {"Content-Type": "application/json"}
ALICE, BOB = "alice-token-0123456789abcdef-0123456", "bob-token-0123456789abcdef-012345678"


def settings_for(data_dir, **extra):
    from service.settings import Settings

    return Settings(data_dir=data_dir, secret_key=SECRET, **extra)


def insert_row(settings, *, status, idempotency_key=None, owner="local", **values):
    """A sweep row as a request in flight (or an earlier one) left it in the API's database."""
    from service.db import Database
    from service.models import Sweep
    from service.specs import check_spec
    from service.sweeps import new_sweep_id

    checked = check_spec(json.loads(json.dumps(SPEC)), settings.data_roots)
    sweep_id = new_sweep_id()
    row = Sweep(id=sweep_id, name="race", status=status, spec_json=checked.canonical_json,
                spec_hash=checked.spec_hash, total_trials=1, idempotency_key=idempotency_key, owner=owner,
                attempt=1, ray_job_id=sweep_id, **values)
    db = Database(settings.database_url)
    with db.session() as s:
        s.add(row)
        s.commit()
    return sweep_id, db


@contextlib.contextmanager
def serving(app, helpers, ray_url):
    """`app` served by uvicorn on a free loopback port in this process (its services can be wrapped for a
    fault); yields the base URL; every job left on the cluster is cancelled afterwards."""
    import uvicorn

    port = helpers.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        helpers.wait_until(lambda: server.started, 30, "uvicorn")
        yield f"http://127.0.0.1:{port}"
    finally:
        helpers.cancel_all_jobs(ray_url)
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def offline_api(tmp_path, helpers):
    """`convtune serve` with Ray unreachable (answers 503 once it must ask Ray) and tokens for two owners."""
    def start(mlflow_url=None, **env):
        mlflow_url = mlflow_url or f"http://127.0.0.1:{helpers.free_port()}"
        full = {**helpers.service_env(tmp_path / "data", f"http://127.0.0.1:{helpers.free_port()}", mlflow_url),
                "CONVTUNE_SECRET_KEY": SECRET, **env}
        procs.append(helpers.ApiProcess(full, tmp_path / f"api-{len(procs)}.log").start())
        return procs[-1]

    procs = []
    yield start
    for proc in procs:
        proc.kill()


def test_replaying_a_key_whose_first_submit_is_in_flight_gets_409_not_a_row_that_may_vanish(offline_api, tmp_path):
    from service.sweeps import scoped_key

    api = offline_api()
    settings = settings_for(tmp_path / "data")
    insert_row(settings, status="SUBMITTING", idempotency_key=scoped_key(settings, "local", "first-try"))
    resp = httpx.post(f"{api.url}/v1/sweeps", json=SPEC, headers={"Idempotency-Key": "first-try"}, timeout=30)
    assert resp.status_code == 409 and resp.headers["Retry-After"] == "2"
    assert "still in progress" in resp.json()["detail"]


def test_idempotency_keys_are_scoped_per_owner(offline_api, tmp_path):
    from service.api.deps import token_owner
    from service.sweeps import scoped_key

    api = offline_api(CONVTUNE_API_TOKENS=f"{ALICE},{BOB}")
    settings = settings_for(tmp_path / "data", api_tokens=f"{ALICE},{BOB}")
    alice = token_owner(settings, ALICE)
    assert alice.startswith("token-") and ALICE not in alice
    sweep_id, _ = insert_row(settings, status="PENDING", owner=alice,
                             idempotency_key=scoped_key(settings, alice, "shared-key"))
    replay = httpx.post(f"{api.url}/v1/sweeps", json=SPEC, timeout=30,
                        headers={"Idempotency-Key": "shared-key", "Authorization": f"Bearer {ALICE}"})
    assert replay.status_code == 202 and replay.json()["id"] == sweep_id and replay.json()["created"] is False
    other = {**SPEC, "num_samples": 2}
    clash = httpx.post(f"{api.url}/v1/sweeps", json=other, timeout=30,
                       headers={"Idempotency-Key": "shared-key", "Authorization": f"Bearer {ALICE}"})
    assert clash.status_code == 409
    # Bob's "shared-key" is his own: not Alice's sweep, not a conflict (here: Ray is down, so 503)
    bob = httpx.post(f"{api.url}/v1/sweeps", json=other, timeout=30,
                     headers={"Idempotency-Key": "shared-key", "Authorization": f"Bearer {BOB}"})
    assert bob.status_code == 503 and sweep_id not in bob.text


@pytest.mark.parametrize("deleted", [True, False], ids=["deleted-run", "never-existed"])
def test_a_missing_mlflow_run_leaves_detail_and_trials_readable(offline_api, tmp_path, mlflow_server, deleted,
                                                                 helpers):
    from mlflow.tracking import MlflowClient


    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment(f"deleted-run-{tmp_path.name}")
    run = client.create_run(experiment)
    run_id = run.info.run_id if deleted else "0123456789abcdef0123456789abcdef"
    client.delete_run(run.info.run_id)
    api = offline_api(mlflow_url=mlflow_server.url)
    # the job just ended: the reconciler's final sync reads the (missing) runs, notes it and finalizes
    sweep_id, _ = insert_row(settings_for(tmp_path / "data"), status="SUCCEEDED",
                             mlflow_experiment_id=experiment, mlflow_parent_run_id=run_id)
    detail = helpers.wait_until(lambda: (r := httpx.get(f"{api.url}/v1/sweeps/{sweep_id}", timeout=30)).json()["finished_at"]
                        and r, 30, "the final sync")
    assert detail.status_code == 200, detail.text
    assert any("no longer exist" in w for w in detail.json()["warnings"])
    trials = httpx.get(f"{api.url}/v1/sweeps/{sweep_id}/trials", timeout=30)
    assert trials.status_code == 200 and trials.json()["trials"] == []
    assert any("no longer exist" in w for w in trials.json()["warnings"])


@pytest.mark.ray
def test_a_finished_sweep_is_read_from_the_database_alone(offline_api, tmp_path):
    """Ray and MLflow unreachable: the finished sweep's detail and trials come from its stored rows, complete."""
    from service.models import Trial, utcnow

    api = offline_api()  # MLflow on a port nobody listens on
    sweep_id, db = insert_row(settings_for(tmp_path / "data"), status="SUCCEEDED", finished_at=utcnow(),
                              best_trial_id="t2", best_value=80.0, model_name="digits", model_version="4")
    with db.session() as s:
        s.add_all([Trial(sweep_id=sweep_id, trial_id=f"t{i}", run_id=f"r{i}", status="FINISHED",
                         params={"blr": str(0.001 * i)}, metrics={"val_top1": 70.0 + 10 * (i - 1), "epoch": 1.0},
                         epoch=1, latest_metric=70.0 + 10 * (i - 1), best_metric=70.0 + 10 * (i - 1),
                         outcome="completed", resolved_lr=0.0001 * i) for i in (1, 2)])
        s.commit()
    detail = httpx.get(f"{api.url}/v1/sweeps/{sweep_id}", timeout=30)
    assert detail.status_code == 200 and detail.json()["warnings"] == [], detail.text
    body = detail.json()
    assert body["best_trial"]["trial_id"] == "t2" and body["best_trial"]["lr"] == pytest.approx(0.0002)
    assert body["model_version"] == "4" and body["progress"]["finished"] == 2
    trials = httpx.get(f"{api.url}/v1/sweeps/{sweep_id}/trials", timeout=30).json()
    assert [t["trial_id"] for t in trials["trials"]] == ["t1", "t2"] and trials["warnings"] == []
    assert trials["trials"][1]["params"] == {"blr": "0.002"} and trials["trials"][1]["outcome"] == "completed"


def test_cancelling_a_sweep_whose_job_is_being_submitted(api_process, helpers, tmp_path):
    from service.models import Sweep, utcnow

    api = api_process(CONVTUNE_SECRET_KEY=SECRET).start()
    sweep_id, db = insert_row(settings_for(tmp_path / "data"), status="SUBMITTING")
    with api.client() as c:
        resp = c.post(f"/v1/sweeps/{sweep_id}/cancel", headers=JSON)
        assert resp.status_code == 202, resp.text
        assert resp.json()["status"] == "STOPPING"
        # past the submit grace period with no job in Ray: the sweep ends STOPPED, not FAILED
        with db.session() as s:
            s.execute(update(Sweep).where(Sweep.id == sweep_id).values(updated_at=utcnow() - timedelta(minutes=5)))
            s.commit()
        detail = helpers.wait_until(lambda: (d := c.get(f"/v1/sweeps/{sweep_id}").json())["status"] == "STOPPED"
                                    and d, 30, "the cancelled sweep to end")
        assert detail["message"] == "cancelled before its job started"


@pytest.mark.ray
def test_a_submit_whose_answer_is_lost_after_ray_accepted_the_job_keeps_tracking_it(make_settings, helpers,
                                                                                    ray_cluster):
    """The job reaches Ray but the answer never reaches the API (a timeout): the row must stay, and the
    sweep's owner reaches Ray's job metadata as an HMAC only."""
    from ray.job_submission import JobSubmissionClient

    from service.app import create_app

    settings = make_settings(secret_key=SECRET, api_tokens=ALICE)
    app = create_app(settings)
    real_submit = app.state.jobs.submit

    def submit_then_lose_the_answer(**kwargs):
        real_submit(**kwargs)
        raise TimeoutError("read timed out")  # the fault: Ray accepted, the answer was lost

    app.state.jobs.submit = submit_then_lose_the_answer
    with serving(app, helpers, ray_cluster.dashboard_url) as base:
        resp = httpx.post(f"{base}/v1/sweeps", json=SPEC, timeout=60,
                          headers={"Authorization": f"Bearer {ALICE}"})
        assert resp.status_code == 202, resp.text
        sweep_id = resp.json()["id"]
        detail = httpx.get(f"{base}/v1/sweeps/{sweep_id}", timeout=30,
                           headers={"Authorization": f"Bearer {ALICE}"}).json()
        assert detail["status"] in {"PENDING", "RUNNING"}
        job = JobSubmissionClient(ray_cluster.dashboard_url).get_job_info(sweep_id)
        owner_tag = job.metadata["convtune_owner"]
        from service.api.deps import token_owner

        assert owner_tag == settings.owner_tag(token_owner(settings, ALICE))
        assert len(owner_tag) == 32 and ALICE not in owner_tag
        listed = httpx.get(f"{base}/v1/sweeps", timeout=30,
                           headers={"Authorization": f"Bearer {ALICE}"}).json()["items"]
        assert [(i["id"], i["owner"]) for i in listed] == [(sweep_id, token_owner(settings, ALICE))]
        # the driver checks the spec's paths again on the node, against the roots the service hands it
        roots = job.runtime_env["env_vars"]["CONVTUNE_DATA_ROOTS"]
        assert roots == ",".join(str(p) for p in settings.data_roots)


@pytest.mark.ray
def test_the_reconciler_reaching_a_submitted_job_first_does_not_cancel_it(helpers, ray_cluster, mlflow_server,
                                                                          tmp_path):
    """The reconciler moves a SUBMITTING row whose job Ray has on to the job's status; when it does so between
    Ray accepting the job and the submit marking the row PENDING, the submit must not take that for a cancel
    (it stopped the job: the sweep went PENDING -> STOPPED with no cancel, seen in CI)."""
    from ray.job_submission import JobSubmissionClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", ray_address=ray_cluster.dashboard_url,
                        mlflow_tracking_uri=mlflow_server.url, secret_key=SECRET, reconcile_interval_s=3600)
    app = create_app(settings)
    jobs, sweeps = app.state.jobs, app.state.sweeps
    real_submit, real_stop, stopped = jobs.submit, jobs.stop, []

    def submit_then_reconcile(**kwargs):
        real_submit(**kwargs)
        sweeps.reconcile(sweeps.get(kwargs["sweep_id"]))  # the reconciler's pass lands first

    def stop(job_id):
        stopped.append(job_id)
        return real_stop(job_id)

    jobs.submit, jobs.stop = submit_then_reconcile, stop
    with serving(app, helpers, ray_cluster.dashboard_url) as base:
        resp = httpx.post(f"{base}/v1/sweeps", json=SPEC, timeout=60)
        assert resp.status_code == 202, resp.text
        sweep_id = resp.json()["id"]
        assert resp.json()["status"] in {"PENDING", "RUNNING"}
        assert stopped == [], "the submit stopped the job it had just submitted"
        status = JobSubmissionClient(ray_cluster.dashboard_url).get_job_status(sweeps.get(sweep_id).ray_job_id)
        assert str(status) not in {"STOPPED", "JobStatus.STOPPED"}
        detail = httpx.get(f"{base}/v1/sweeps/{sweep_id}", timeout=30).json()
        assert detail["status"] in {"PENDING", "RUNNING", "SUCCEEDED"}


@pytest.mark.ray
@pytest.mark.parametrize("action", ["submit", "resume"])
def test_a_cancel_during_the_submit_stops_the_job_once_it_exists(action, helpers, ray_cluster, mlflow_server,
                                                                 tmp_path):
    """A cancel that finds no job yet (the submit is in flight) marks the row; the submit, once Ray has the
    job, must stop it: for a new sweep and for a resume's new attempt alike."""
    from ray.job_submission import JobSubmissionClient

    from service.app import create_app
    from service.models import utcnow
    from service.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", ray_address=ray_cluster.dashboard_url,
                        mlflow_tracking_uri=mlflow_server.url, secret_key=SECRET, reconcile_interval_s=3600)
    app = create_app(settings)
    jobs, sweeps = app.state.jobs, app.state.sweeps
    real_submit, real_stop, stopped = jobs.submit, jobs.stop, []

    def cancel_then_submit(**kwargs):
        cancelled = sweeps.cancel(kwargs["sweep_id"])  # Ray has no job yet: the row is marked instead
        assert cancelled.status == "STOPPING" and cancelled.message == "cancelled while its job was being submitted"
        real_submit(**kwargs)

    def stop(job_id):  # the stops Ray carried out (the cancel's own try finds no job and raises)
        answer = real_stop(job_id)
        stopped.append(job_id)
        return answer

    jobs.submit, jobs.stop = cancel_then_submit, stop
    with serving(app, helpers, ray_cluster.dashboard_url) as base:
        if action == "submit":
            resp = httpx.post(f"{base}/v1/sweeps", json=SPEC, timeout=60)
        else:
            sweep_id, _ = insert_row(settings, status="STOPPED", finished_at=utcnow())
            resp = httpx.post(f"{base}/v1/sweeps/{sweep_id}/resume", headers=JSON, timeout=60)
        assert resp.status_code == 202, resp.text
        row = sweeps.get(resp.json()["id"])
        assert row.status == "STOPPING" and row.attempt == (1 if action == "submit" else 2)
        assert stopped == [row.ray_job_id]  # the job that arrived after the cancel, and only it
        status = JobSubmissionClient(ray_cluster.dashboard_url).get_job_status(row.ray_job_id)
        assert str(status).rsplit(".", 1)[-1] in {"STOPPED", "PENDING", "RUNNING"}  # stop asked; Ray ends it
