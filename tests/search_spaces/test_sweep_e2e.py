"""Real sweeps: Ray Tune over Ray Train finetunes of convnextv2_atto on digits, logged to a real MLflow.

Kept small for CI (2 CPUs): trials of 1 worker x 1 CPU, 3 epochs of a few updates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from testkit import wait_until

from search_spaces.driver import run_sweep
from search_spaces.spec import load_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BASE = {"model": "convnextv2_atto", "dataset": "digits", "input_size": 32, "epochs": 3,
        "steps_per_epoch_limit": 3, "batch_size": 32, "warmup_epochs": 0}


def child_runs(url, result):
    client = MlflowClient(url)
    parent = client.get_run(result.mlflow_parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, parent, runs


def test_asha_sweep_on_digits(ray_connected, mlflow_server, tmp_path):
    """ASHA over the in_process opt-in (ASHA over the default Ray Train trials, 2 workers each, is
    test_trial_cleanup.py)."""
    import ray

    in_process = True

    spec = load_spec({
        "name": "asha-e2e", "base": BASE,
        "space": {"blr": {"type": "loguniform", "low": 1e-5, "high": 3e-2},
                  "layer_decay": {"type": "uniform", "low": 0.6, "high": 1.0},
                  "schedule": {"type": "choice", "values": ["cosine", "linear"]}},
        "search": {"algorithm": "random", "seed": 1},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "num_samples": 4,
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "in_process": in_process},
    })
    sweep_id = f"asha-{'inproc' if in_process else 'train'}"
    result = run_sweep(spec, sweep_id=sweep_id, storage_path=str(tmp_path), mlflow_uri=mlflow_server.url)

    assert result.status == "finished" and len(result.trials) == 4
    assert all(t["status"] == "TERMINATED" for t in result.trials)
    assert result.counts.get("early_stopped", 0) >= 1, result.trials  # ASHA stopped someone
    assert result.counts.get("completed", 0) >= 1
    best = result.best
    assert best["metric"] == max(t["best_val_top1"] for t in result.trials)
    assert set(best["params"]) == {"blr", "layer_decay", "schedule"} and best["finetune"]["epochs"] == 3
    assert best["checkpoint_path"] and Path(best["checkpoint_path"]).is_dir()

    client, parent, runs = child_runs(mlflow_server.url, result)
    assert parent.info.status == "FINISHED" and parent.data.tags["convtune.sweep_id"] == sweep_id
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}  # none left RUNNING
    by_trial = {r.data.tags["convtune.trial_id"]: r for r in runs}
    for t in result.trials:
        run = by_trial[t["trial_id"]]
        assert run.data.tags["convtune.outcome"] == t["outcome"]
        # logged by the driver from Tune's results: exactly the epochs Tune saw, a stopped trial's too
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
        assert steps == list(range(1, t["epochs"] + 1))
    assert float(parent.data.metrics["best_val_top1"]) == pytest.approx(best["metric"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/learning_curves.png" in artifacts and "plots/val_top1_vs_blr.png" in artifacts

    # nothing of stopped trials is left holding resources: placement groups, Train controllers and workers
    def all_released():
        groups = ray.util.placement_group_table().values()
        from ray.util.state import list_actors

        alive = [a for a in list_actors(address=ray_connected.gcs_address, filters=[("state", "=", "ALIVE")])
                 if a["class_name"] in ("TrainController", "RayTrainWorker", "ImplicitFunc")]
        return all(pg["state"] == "REMOVED" for pg in groups) and not alive

    wait_until(all_released, 60, "the placement groups and actors of finished trials to be released")


def _result_lines(experiment: Path) -> dict[str, list[dict]]:
    out = {}
    for path in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def test_killed_sweep_resumes_without_repeating_work(ray_connected, mlflow_server, tmp_path):
    """Train trials (the default path) resume from their Train run's checkpoints."""
    # epochs long enough (~2 s) that the second trial is still training when the signal lands
    spec_data = {
        "name": "resume-e2e", "base": {**BASE, "epochs": 4, "steps_per_epoch_limit": 8},
        "space": {"blr": {"type": "grid", "values": [2e-3, 4e-3]}},
        "search": {"algorithm": "grid"}, "scheduler": {"type": "fifo"}, "num_samples": 1,
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1},
    }
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_data))
    sweep_id = "resume-train"
    storage, experiment = tmp_path / "state", tmp_path / "state" / sweep_id
    cmd = [sys.executable, "-m", "search_spaces.driver", "--spec", str(spec_file), "--sweep-id", sweep_id,
           "--storage-path", str(storage), "--mlflow-uri", mlflow_server.url,
           "--address", ray_connected.gcs_address]
    env = {**ray_connected.env, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # first trial finished, second one has reported (and checkpointed) its first epoch
            def midway():
                lines = _result_lines(experiment)
                done = [t for t, rows in lines.items() if rows[-1]["epoch"] == 4]
                going = [t for t, rows in lines.items() if rows[-1]["epoch"] == 1]
                return (done, going) if len(done) == 1 and len(going) == 1 else None

            done, going = wait_until(midway, 300, "one finished and one half-way trial")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 3, (tmp_path / "driver.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    before = _result_lines(experiment)

    result = run_sweep(load_spec(spec_file), sweep_id=sweep_id, storage_path=str(storage),
                       mlflow_uri=mlflow_server.url, resume=True)
    after = _result_lines(experiment)
    assert result.status == "finished" and result.resumed and len(result.trials) == 2
    assert after[done[0]] == before[done[0]]  # the finished trial was not run again
    resumed_epochs = [r["epoch"] for r in after[going[0]][len(before[going[0]]):]]
    assert resumed_epochs and resumed_epochs[0] >= 2 and resumed_epochs[-1] == 4  # continued, not restarted
    client, parent, runs = child_runs(mlflow_server.url, result)
    assert parent.info.status == "FINISHED" and len(runs) == 2
    parents = client.search_runs([parent.info.experiment_id], f"tags.`convtune.sweep_id` = '{sweep_id}' and "
                                 "tags.`convtune.kind` = 'sweep'")
    assert [p.info.run_id for p in parents] == [parent.info.run_id]  # the resumed sweep kept its parent run
    assert {r.info.status for r in runs} == {"FINISHED"}
    finished_run = next(r for r in runs if r.data.tags["convtune.trial_id"] == done[0])
    assert [m.step for m in client.get_metric_history(finished_run.info.run_id, "val_top1")] == [1, 2, 3, 4]


def test_resume_of_an_unknown_sweep_is_an_error(ray_connected, mlflow_server, tmp_path):
    from search_spaces.driver import SweepNotFoundError

    spec = load_spec({"name": "nothing", "base": BASE, "space": {"blr": {"type": "grid", "values": [1e-3]}}})
    with pytest.raises(SweepNotFoundError, match="no saved sweep"):
        run_sweep(spec, sweep_id="never-ran", storage_path=str(tmp_path), mlflow_uri=mlflow_server.url,
                  resume=True)
    assert os.listdir(tmp_path) == []  # nothing half-created
