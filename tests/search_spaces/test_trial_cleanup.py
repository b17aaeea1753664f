"""A stopped 2-worker Ray Train trial leaves nothing behind: no placement group, no actor, no RUNNING run.

Counted with the State API of the session cluster (``ray.util.state``), after ASHA stops trials and after
a sweep is cancelled (SIGTERM, as the service's cancel does through Ray's job stop) mid-trial.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient
from testkit import wait_until

from search_spaces.driver import run_sweep
from search_spaces.spec import load_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BASE = {"model": "convnextv2_atto", "dataset": "digits", "input_size": 32, "epochs": 3,
        "steps_per_epoch_limit": 3, "batch_size": 32, "warmup_epochs": 0}
TWO_WORKERS = {"workers_per_trial": 2, "cpus_per_worker": 1}  # 2 CPUs: one trial at a time
#: the actors a trial consists of (Tune's trial process, Train's controller, workers and helpers)
TRIAL_ACTORS = {"ImplicitFunc", "TrainController", "RayTrainWorker", "PlacementGroupCleaner", "_QueueActor",
                "SynchronizationActor", "DatasetManager"}


def leftovers(address: str, job_id: str) -> dict[str, list]:
    from ray.util.state import list_actors, list_placement_groups

    groups = [g.placement_group_id for g in list_placement_groups(address=address, detail=True, limit=10_000)
              if g.creator_job_id == job_id and g.state != "REMOVED"]
    actors = [a.class_name for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10_000)
              if a.job_id == job_id and a.class_name in TRIAL_ACTORS]
    return {"placement_groups": groups, "actors": actors}


def running_runs(mlflow_url: str, sweep_id: str) -> list[str]:
    client = MlflowClient(mlflow_url)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`convtune.sweep_id` = '{sweep_id}'")
    return [r.info.run_id for r in runs if r.info.status == "RUNNING"]


def wait_clean(address: str, job_id: str, mlflow_url: str, sweep_id: str) -> None:
    seen: dict = {}

    def clean():
        seen.update(leftovers(address, job_id), running=running_runs(mlflow_url, sweep_id))
        return not any(seen.values())

    try:
        wait_until(clean, 60, "the sweep's placement groups, actors and RUNNING runs to be gone")
    except TimeoutError as exc:
        raise AssertionError(f"left behind: {seen}") from exc


def test_asha_stopped_two_worker_trials_leave_nothing(ray_connected, mlflow_server, tmp_path):
    import ray

    spec = load_spec({
        "name": "cleanup-asha", "base": BASE,
        # the second learns slowly: at the first rung it is below the median, and ASHA stops it
        "space": {"blr": {"type": "grid", "values": [3e-3, 1e-5]}},
        "search": {"algorithm": "grid"},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": TWO_WORKERS,
    })
    assert spec.resources.uses_train  # the default: every trial is a Ray Train run
    result = run_sweep(spec, sweep_id="cleanup-asha", storage_path=str(tmp_path), mlflow_uri=mlflow_server.url)
    assert result.status == "finished" and len(result.trials) == 2
    assert result.counts.get("early_stopped", 0) >= 1, result.trials  # stopped mid-run by ASHA
    run = MlflowClient(mlflow_server.url).get_run(result.trials[0]["mlflow_run_id"])
    assert run.data.tags["convtune.execution"] == "ray_train" and run.data.params.get("world_size") == "2"
    wait_clean(ray_connected.gcs_address, ray.get_runtime_context().get_job_id(), mlflow_server.url, "cleanup-asha")


def test_a_cancelled_two_worker_trial_leaves_nothing(ray_connected, mlflow_server, tmp_path):
    from ray.util.state import list_actors

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "cleanup-cancel", "base": {**BASE, "epochs": 20, "steps_per_epoch_limit": 8},
        "space": {"blr": {"type": "grid", "values": [2e-3, 4e-3]}}, "search": {"algorithm": "grid"},
        "resources": TWO_WORKERS}))
    cmd = [sys.executable, "-m", "search_spaces.driver", "--spec", str(spec_file), "--sweep-id", "cleanup-cancel",
           "--storage-path", str(tmp_path / "state"), "--mlflow-uri", mlflow_server.url,
           "--address", ray_connected.gcs_address]
    address = ray_connected.gcs_address
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(cmd, env=ray_connected.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            def training_workers():  # both workers of the first trial are up: its Train run is training
                workers = [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE"),
                                                                           ("class_name", "=", "RayTrainWorker")])]
                return workers if len(workers) == 2 else None

            workers = wait_until(training_workers, 240, "a 2-worker trial to be training")
            assert running_runs(mlflow_server.url, "cleanup-cancel")  # its MLflow run is open
            proc.send_signal(signal.SIGTERM)  # what a cancel sends the driver (Ray's job stop: SIGINT, same path)
            assert proc.wait(timeout=120) == 3, (tmp_path / "driver.log").read_text()[-3000:]  # interrupted
        finally:
            if proc.poll() is None:
                proc.kill()
    wait_clean(address, workers[0].job_id, mlflow_server.url, "cleanup-cancel")


def test_the_driver_removes_the_placement_group_of_dead_train_workers(ray_connected):
    """Train's own cleaner can fail to find the cluster (another Ray on the host, a stale address file); the
    sweep driver's check removes a group whose Train workers are all dead, and only such a group."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from search_spaces.cleanup import remove_leaked_placement_groups

    job_id = ray.get_runtime_context().get_job_id()
    dead_pg, live_pg, empty_pg = (placement_group([{"CPU": 0.01}]) for _ in range(3))
    ray.get([g.ready() for g in (dead_pg, live_pg, empty_pg)])
    # named as the State API names Ray Train's workers (by qualified name); pickled by value (__main__)
    worker_cls = ray.remote(num_cpus=0.01)(type("RayTrainWorker", (), {"__module__": "__main__",
                                                                       "ready": lambda self: True}))
    in_pg = lambda g: worker_cls.options(  # noqa: E731
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=g)).remote()
    dead, live = in_pg(dead_pg), in_pg(live_pg)
    ray.get([dead.ready.remote(), live.ready.remote()])
    ray.kill(dead)
    try:
        def removed():
            return remove_leaked_placement_groups(job_id)[0]

        assert wait_until(removed, 30, "the dead worker group's placement group to be removed") == [dead_pg.id.hex()]
        states = {k: v["state"] for k, v in placement_group_table().items()}
        assert states[dead_pg.id.hex()] == "REMOVED"
        assert states[live_pg.id.hex()] == "CREATED" and states[empty_pg.id.hex()] == "CREATED"  # in use / not yet
    finally:
        ray.kill(live)
        for g in (live_pg, empty_pg):
            ray.util.remove_placement_group(g)
