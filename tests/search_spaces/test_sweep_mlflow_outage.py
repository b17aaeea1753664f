"""An MLflow outage in the middle of a sweep: a real server, stopped for 30 s while a Ray Train trial trains."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from testkit import RestartableMlflow, stop_process_group

from search_spaces.driver import run_sweep
from search_spaces.spec import load_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

OUTAGE_S = 30.0


class Outage(Callback):
    """Stops the server when the first epoch's result reaches the driver; starts it again OUTAGE_S later."""

    def __init__(self, server: RestartableMlflow):
        self.server, self.seen_while_down, self.back = server, [], threading.Event()
        self.down_at: float | None = None

    def __getstate__(self):  # Tune pickles its callbacks into the experiment state; this one is not restored
        return {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.down_at is None:
            self.server.stop()
            self.down_at = time.monotonic()
            threading.Thread(target=self._restart, daemon=True).start()
        elif not self.back.is_set():
            self.seen_while_down.append(result["epoch"])

    def _restart(self):
        threading.Event().wait(OUTAGE_S)  # the outage's length (the scenario), not a wait for state
        self.server.start()
        self.back.set()


def test_metrics_of_epochs_trained_while_mlflow_was_down_reach_it_and_no_run_stays_running(ray_connected,
                                                                                               tmp_path):
    server = RestartableMlflow(tmp_path)
    server.start()
    try:
        spec = load_spec({
            "name": "outage-e2e",
            "base": {"model": "convnextv2_atto", "dataset": "digits", "input_size": 32, "epochs": 3,
                     "steps_per_epoch_limit": 3, "batch_size": 32, "warmup_epochs": 0},
            "space": {"blr": {"type": "grid", "values": [2e-3]}}, "search": {"algorithm": "grid"},
            "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        })
        outage = Outage(server)
        result = run_sweep(spec, sweep_id="outage", storage_path=str(tmp_path / "state"), mlflow_uri=server.url,
                           callbacks=(outage,))
        assert outage.back.is_set()  # the sweep waited for the buffered calls until the server was back
        assert outage.seen_while_down, "no epoch was trained while MLflow was down"

        assert result.status == "finished" and result.counts == {"completed": 1}
        client = MlflowClient(server.url)
        parent = client.get_run(result.mlflow_parent_run_id)
        (run,) = client.search_runs([parent.info.experiment_id],
                                    f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert parent.info.status == "FINISHED" and run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_top1")
        assert [m.step for m in history] == [1, 2, 3]  # every epoch once, those of the outage included
        assert history[-1].value == pytest.approx(result.trials[0]["last_val_top1"])
        assert run.data.tags["convtune.outcome"] == "completed"
        assert "param_groups.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}  # rank 0's set-up
    finally:
        stop_process_group(server.proc)
