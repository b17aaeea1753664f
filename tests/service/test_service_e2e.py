"""End to end through real HTTP: a real API process, the session's Ray head and MLflow server, and
sweeps that really train (the quickstart shrunk to 2 trials of 2 epochs x 2 steps)."""

from __future__ import annotations

import signal

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.ray, pytest.mark.slow]
# long-lived actors of the cluster itself, not of any trial
CLUSTER_SINGLETONS = {"JobSupervisor", "_AutoscalingCoordinatorActor"}


def sweep_runs(mlflow_url: str, sweep_id: str):
    client = MlflowClient(mlflow_url)
    exp = client.get_experiment_by_name("convtune-tiny")
    runs = client.search_runs([exp.experiment_id], f"tags.`convtune.sweep_id` = '{sweep_id}'")
    parent = [r for r in runs if r.data.tags.get("convtune.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("convtune.kind") == "trial"]
    return parent, trials


def test_submit_is_idempotent_and_tracked_to_the_end_across_an_api_restart(
        api_process, tiny_spec, ray_cluster, mlflow_server, helpers):
    from ray.job_submission import JobSubmissionClient

    tiny_spec["num_samples"] = 1  # one trial: the API restart is what is tested, not the search
    api = api_process().start()
    try:
        with api.client() as c:
            first = c.post("/v1/sweeps", json=tiny_spec, headers={"Idempotency-Key": "e2e-restart"})
            assert first.status_code == 202, first.text
            sweep_id = first.json()["id"]
            again = c.post("/v1/sweeps", json=tiny_spec, headers={"Idempotency-Key": "e2e-restart"})
            assert again.status_code == 202 and again.json() == {**first.json(), "created": False}
            tiny_spec["num_samples"] = 3
            clash = c.post("/v1/sweeps", json=tiny_spec, headers={"Idempotency-Key": "e2e-restart"})
            assert clash.status_code == 409
            jobs = [j for j in JobSubmissionClient(ray_cluster.dashboard_url).list_jobs()
                    if (j.submission_id or "").startswith(sweep_id)]
            assert [j.submission_id for j in jobs] == [sweep_id]  # one Ray job, id = sweep id
            helpers.wait_status(c, sweep_id, {"RUNNING"}, 120)

        api.kill(signal.SIGKILL)  # the API dies mid-sweep; the sweep does not
        api = api_process().start()
        with api.client() as c:
            detail = helpers.wait_status(c, sweep_id, {"SUCCEEDED"}, 420)
            assert detail["progress"]["finished"] == 1 and detail["progress"]["pending"] == 0
            assert detail["links"]["mlflow"].startswith(mlflow_server.url)
            trials = c.get(f"/v1/sweeps/{sweep_id}/trials").json()["trials"]
            assert len(trials) == 1 and {t["status"] for t in trials} == {"FINISHED"}
            top = max(trials, key=lambda t: t["metrics"]["val_top1"])  # the spec maximises val_top1
            assert detail["best_trial"]["trial_id"] == top["trial_id"]
            assert detail["best_trial"]["metrics"]["val_top1"] == top["metrics"]["val_top1"]
            assert all({"blr", "layer_decay"} <= set(t["params"]) and "val_top1" in t["metrics"] for t in trials)
            logs = c.get(f"/v1/sweeps/{sweep_id}/logs", params={"tail": 30})
            assert logs.status_code == 200 and logs.text.strip()
            follow = c.get(f"/v1/sweeps/{sweep_id}/logs", params={"follow": "true"})  # ended: stream closes
            assert follow.status_code == 200 and len(follow.text) >= len(logs.text)
        parent, runs = sweep_runs(mlflow_server.url, sweep_id)
        assert [p.info.status for p in parent] == ["FINISHED"]
        assert [r.info.status for r in runs] == ["FINISHED"]
    finally:
        helpers.cancel_all_jobs(ray_cluster.dashboard_url)


def test_cancel_stops_cleanly_and_resume_finishes_without_retraining(
        api_process, tiny_spec, ray_cluster, mlflow_server, helpers):
    from ray.util.state import list_actors, list_placement_groups

    api = api_process().start()
    try:
        with api.client() as c:
            sweep_id = c.post("/v1/sweeps", json=tiny_spec).json()["id"]

            def first_trial_done():  # trials run one at a time: cancel while the second one trains
                trials = c.get(f"/v1/sweeps/{sweep_id}/trials").json()["trials"]
                done = [t for t in trials if t["status"] == "FINISHED"]
                return done if done and len(trials) == 2 else None

            done = helpers.wait_until(first_trial_done, 300, "the first trial to finish", interval=1.0)
            cancel = c.post(f"/v1/sweeps/{sweep_id}/cancel", headers={"Content-Type": "application/json"})
            assert cancel.status_code == 202 and cancel.json()["status"] == "STOPPING"
            stopped = helpers.wait_status(c, sweep_id, {"STOPPED"}, 180)
            assert stopped["progress"]["finished"] == 1

            address = ray_cluster.dashboard_url
            helpers.wait_until(lambda: not list_placement_groups(address=address, filters=[("state", "=", "CREATED")]),
                               90, "no placement groups left")
            alive: list = []
            from ray.job_submission import JobSubmissionClient

            # the sweep's Ray jobs (one per attempt); actors of other tests' drivers are not this sweep's
            sweep_jobs = {j.job_id for j in JobSubmissionClient(address).list_jobs()
                          if (j.submission_id or "").startswith(sweep_id) and j.job_id}
            assert sweep_jobs, "the sweep's Ray job is not listed"

            def no_trial_actors():
                alive[:] = [a.class_name for a in list_actors(address=address, filters=[("state", "=", "ALIVE")])
                            if a.class_name not in CLUSTER_SINGLETONS and a.job_id in sweep_jobs]
                return not alive

            try:
                helpers.wait_until(no_trial_actors, 90, "no trial actors left")
            except TimeoutError as exc:
                raise AssertionError(f"actors still alive after the cancel: {alive}") from exc
            helpers.wait_until(lambda: all(r.info.status != "RUNNING" for r in sum(
                sweep_runs(mlflow_server.url, sweep_id), [])), 60, "no MLflow run left RUNNING")
            _, runs = sweep_runs(mlflow_server.url, sweep_id)
            finished_before = {r.info.run_id: r.info.end_time for r in runs if r.info.status == "FINISHED"}
            assert set(finished_before) == {done[0]["run_id"]}
            assert {r.info.status for r in runs} == {"FINISHED", "KILLED"}

            resumed = c.post(f"/v1/sweeps/{sweep_id}/resume", headers={"Content-Type": "application/json"})
            assert resumed.status_code == 202 and resumed.json()["attempt"] == 2
            assert c.post(f"/v1/sweeps/{sweep_id}/resume", headers={"Content-Type": "application/json"}).status_code == 409  # one attempt at a time
            final = helpers.wait_status(c, sweep_id, {"SUCCEEDED"}, 300)
            assert final["progress"]["finished"] == 2
            assert c.get(f"/v1/sweeps/{sweep_id}/logs", params={"attempt": 2}).status_code == 200
        parent, runs = sweep_runs(mlflow_server.url, sweep_id)
        assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
        for run in runs:  # the trial finished before the cancel was not trained again
            if run.info.run_id in finished_before:
                assert run.info.end_time == finished_before[run.info.run_id]
        assert parent[0].info.status == "FINISHED"
    finally:
        helpers.cancel_all_jobs(ray_cluster.dashboard_url)
