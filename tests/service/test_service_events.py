"""The live event stream (issue 10 item 2) over real HTTP: `convtune serve` with its reconciler, a real Ray
job whose status the reconciler follows, and a real MLflow server in which this test plays the sweep driver
(it writes the parent and trial runs, params and metrics as search_spaces.tracking does). The sweep row is
what a submit leaves in the API's database; the driver itself is exercised by tests/service/test_cli_e2e.py.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid

import httpx
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from service.cli.live import parse_sse

pytestmark = pytest.mark.ray
ALICE = "alice-token-0123456789abcdef-0123456"
BOB = "bob-token-0123456789abcdef-012345678"
TOKENS = f"alice@{ALICE}:read+submit,bob@{BOB}:read+submit"


class Listener:
    """Reads /events in a thread with the client's own SSE parser; keeps the events and the raw lines."""

    def __init__(self, url: str, sweep_id: str, token: str, last_event_id: str | None = None):
        self.events, self.lines, self.ended_by_server, self.error = [], [], False, None
        headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self._stop = threading.Event()
        self._args = (f"{url}/v1/sweeps/{sweep_id}/events", headers)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _lines(self, resp):
        for line in resp.iter_lines():
            self.lines.append(line)
            if self._stop.is_set():
                return
            yield line

    def _run(self):
        try:
            with httpx.stream("GET", *self._args[:1], headers=self._args[1], timeout=httpx.Timeout(10, read=30)) as r:
                self.status, self.content_type = r.status_code, r.headers.get("content-type", "")
                for event in parse_sse(self._lines(r)):
                    self.events.append(event)
            self.ended_by_server = not self._stop.is_set()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def close(self):
        self._stop.set()  # takes effect at the next line: the heartbeat comes within a second
        self.thread.join(timeout=30)

    def of(self, kind: str, **match):
        return [e for e in self.events if e.event == kind and all(e.data.get(k) == v for k, v in match.items())]


def test_events_follow_the_reconciler_resume_without_gaps_and_end_with_the_sweep(
        api_process, ray_cluster, mlflow_server, database_url, helpers, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from service.db import Database
    from service.models import Sweep

    name = f"events-{uuid.uuid4().hex[:6]}"
    spec = {"name": name, "space": {"blr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
                                    "layer_decay": {"type": "uniform", "low": 0.7, "high": 1.0}},
            "metric": "val_top1", "mode": "max", "num_samples": 2}
    sweep_id = f"sw-{uuid.uuid4().hex[:12]}"
    done_file = tmp_path / "driver-may-end"
    jobs = JobSubmissionClient(ray_cluster.dashboard_url)
    job_id = jobs.submit_job(submission_id=f"{sweep_id}-events", entrypoint=(  # the driver's stand-in: runs until told
        f"{sys.executable} -c \"import os, time; t = time.time(); "
        f"[time.sleep(0.2) for _ in iter(lambda: os.path.exists('{done_file}') or time.time() - t > 300, True)]\""))
    db = Database(database_url)
    with db.session() as s:
        s.add(Sweep(id=sweep_id, name=name, status="PENDING", spec_json=json.dumps(spec), spec_hash="0" * 64,
                    owner="alice", total_trials=2, attempt=1, ray_job_id=job_id))
        s.commit()
    mlflow = MlflowClient(mlflow_server.url)
    experiment = mlflow.create_experiment(f"convtune-{name}")
    parent = mlflow.create_run(experiment, tags={"convtune.sweep_id": sweep_id, "convtune.kind": "sweep"}).info.run_id

    def trial_run(trial_id: str, **params) -> str:
        run = mlflow.create_run(experiment, run_name=f"{sweep_id}-{trial_id}", tags={
            "mlflow.parentRunId": parent, "convtune.sweep_id": sweep_id, "convtune.trial_id": trial_id,
            "convtune.kind": "trial"}).info.run_id
        mlflow.log_batch(run, params=[Param(k, str(v)) for k, v in params.items()])
        return run

    def epoch(run: str, n: int, value: float):
        mlflow.log_batch(run, metrics=[Metric("epoch", n, 0, n), Metric("val_top1", value, 0, n),
                                       Metric("train_loss", 2.0 / n, 0, n)])

    api = api_process(CONVTUNE_API_TOKENS=TOKENS, CONVTUNE_DATABASE_URL=database_url,
                      CONVTUNE_EVENTS_HEARTBEAT_S="1").start()
    alice = api.client(ALICE)
    first = Listener(api.url, sweep_id, ALICE)
    try:
        helpers.wait_until(lambda: first.of("sweep", status="RUNNING"), 60, "the reconciler to see the job run")
        assert first.status == 200 and first.content_type.startswith("text/event-stream")
        assert first.events[0].event == "sweep" and first.events[0].id is None  # the snapshot opens the stream

        t1 = trial_run("t1", blr=0.004, layer_decay=0.9, resolved_lr=0.0005, optimizer="adamw")
        mlflow.update_run(t1, status="RUNNING")
        epoch(t1, 1, 40.0)
        helpers.wait_until(lambda: first.of("trial_result", trial_id="t1"), 30, "t1's first epoch as an event")
        started = first.of("trial_started", trial_id="t1")
        assert len(started) == 1 and started[0].data["params"] == {"blr": "0.004", "layer_decay": "0.9"}
        assert started[0].data["lr"] == pytest.approx(0.0005)
        result = first.of("trial_result", trial_id="t1")[0]
        assert result.data["epoch"] == 1 and result.data["metrics"]["val_top1"] == 40.0
        helpers.wait_until(lambda: any(line.startswith(": heartbeat") for line in first.lines), 10, "a heartbeat")
        first.close()
        assert first.error is None and not first.ended_by_server

        # while nobody listens: t1 trains on and finishes, t2 starts and fails
        epoch(t1, 2, 60.0)
        mlflow.log_batch(t1, metrics=[Metric("best_val_top1", 60.0, 0, 2)],
                         tags=[RunTag("convtune.outcome", "completed")])
        mlflow.set_terminated(t1, "FINISHED")
        t2 = trial_run("t2", blr=0.001, layer_decay=0.7, resolved_lr=0.0001)
        mlflow.update_run(t2, status="RUNNING")
        epoch(t2, 1, 10.0)
        mlflow.set_terminated(t2, "FAILED")
        helpers.wait_until(lambda: {t["trial_id"]: t["status"] for t in alice.get(
            f"/v1/sweeps/{sweep_id}/trials").json()["trials"]} == {"t1": "FINISHED", "t2": "FAILED"}, 30,
            "the reconciler to store both trials' ends")

        assert bob_cannot_see(api, sweep_id)
        resumed = Listener(api.url, sweep_id, ALICE, last_event_id=first.events[-1].id)
        helpers.wait_until(lambda: resumed.of("trial_ended", trial_id="t2"), 30, "the replay after Last-Event-ID")
        # the driver registers the winner, ends its parent run and exits: the sweep succeeds
        mlflow.set_tag(parent, "registered_model_name", name)
        mlflow.set_tag(parent, "registered_model_version", "1")
        mlflow.set_terminated(parent, "FINISHED")
        done_file.write_text("done")
        resumed.thread.join(timeout=120)
        assert resumed.error is None and resumed.ended_by_server, "the stream must end with the sweep"
    finally:
        done_file.write_text("done")
        first.close()

    ids = [int(e.id) for e in first.events + resumed.events if e.id is not None]
    assert ids == list(range(1, len(ids) + 1)), f"a resumed stream repeated or skipped events: {ids}"
    kinds = [(e.event, e.data.get("trial_id")) for e in resumed.events if e.id is not None]
    assert kinds[:1] == [("trial_result", "t1")] and ("trial_ended", "t1") in kinds
    assert [k for k in kinds if k[1] == "t2"] == [("trial_started", "t2"), ("trial_result", "t2"),
                                                  ("trial_ended", "t2")]
    (t1_end,) = resumed.of("trial_ended", trial_id="t1")
    assert t1_end.data["outcome"] == "completed" and t1_end.data["epoch"] == 2 and t1_end.data["best_metric"] == 60.0
    assert resumed.of("trial_ended", trial_id="t2")[0].data["outcome"] == "failed"
    last = resumed.events[-1]
    assert last.event == "sweep" and last.data["status"] == "SUCCEEDED" and last.data["final"] is True
    assert last.data["best"] == {"trial_id": "t1", "metric": "val_top1", "value": 60.0,
                                 "params": {"blr": "0.004", "layer_decay": "0.9"}, "lr": 0.0005}
    assert last.data["model_version"] == "1"

    # the finished sweep, from the database: detail with the winner and its model version, ETag / 304
    detail = alice.get(f"/v1/sweeps/{sweep_id}")
    body = detail.json()
    assert body["status"] == "SUCCEEDED" and body["finished_at"] and body["model_version"] == "1"
    assert body["best_trial"]["trial_id"] == "t1" and body["best_trial"]["params"] == {"blr": "0.004",
                                                                                      "layer_decay": "0.9"}
    assert body["progress"]["finished"] == 1 and body["progress"]["failed"] == 1 and body["progress"]["total"] == 2
    etag = detail.headers["etag"]
    assert etag.startswith('"') and alice.get(f"/v1/sweeps/{sweep_id}", headers={"If-None-Match": etag}).status_code == 304
    trials = alice.get(f"/v1/sweeps/{sweep_id}/trials")
    assert alice.get(f"/v1/sweeps/{sweep_id}/trials", headers={"If-None-Match": trials.headers["etag"]}).status_code == 304
    # a new stream of the finished sweep replays everything it had and closes
    replay = Listener(api.url, sweep_id, ALICE)
    replay.thread.join(timeout=30)
    assert replay.ended_by_server and [e.id for e in replay.events] == [str(i) for i in ids]


def bob_cannot_see(api, sweep_id: str) -> bool:
    """Another owner's sweep is 404 on the stream (its id does not leak); no token is 401."""
    with api.client(BOB) as bob:
        assert bob.get(f"/v1/sweeps/{sweep_id}/events").status_code == 404
    with api.client() as anonymous:
        assert anonymous.get(f"/v1/sweeps/{sweep_id}/events").status_code == 401
    return True
