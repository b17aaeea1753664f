"""The finetune on a real Ray cluster: 2 DDP workers through build_torch_trainer, and `convtune train`."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from trainers.checkpoints import TRAIN_STATE_FILE
from trainers.config import FinetuneConfig
from trainers.ray_run import build_torch_trainer, train_loop_config

pytestmark = pytest.mark.ray
TINY = {"input_size": 32, "batch_size": 16, "steps_per_epoch_limit": 2, "epochs": 2, "warmup_epochs": 0.5}


def test_two_cpu_workers_train_report_and_checkpoint(ray_connected, mlflow_server, tmp_path):
    cfg = FinetuneConfig(**TINY)
    config = train_loop_config(cfg, cpus_per_worker=1,
                               mlflow={"tracking_uri": mlflow_server.url, "experiment_name": "test-ray-2w"})
    trainer = build_torch_trainer(config, name="two-workers", storage_path=str(tmp_path), num_workers=2,
                                  cpus_per_worker=1, controller_failure_limit=0)
    result = trainer.fit()
    assert result.error is None
    assert result.metrics["epoch"] == 2
    # the run started no detached PlacementGroupCleaner (trainers.ray_run.trainer_class): none can be orphaned;
    # and no DatasetManager, as it has no Ray Datasets
    import ray
    from ray.util.state import list_actors

    job_id = ray.get_runtime_context().get_job_id()
    started = {a.class_name for a in list_actors(address=ray_connected.gcs_address, limit=10_000,
                                                  filters=[("job_id", "=", job_id)])}
    assert "TrainController" in started and "RayTrainWorker" in started
    assert not started & {"PlacementGroupCleaner", "DatasetManager"}
    frame = result.metrics_dataframe
    assert list(frame["epoch"]) == [1, 2]
    best = result.get_best_checkpoint("val_top1", "max")
    with best.as_directory() as d:
        state = torch.load(Path(d) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    assert state["step"] in (2, 4) and state["config"]["model"] == "convnextv2_atto"
    # the reported top-1 is the checkpointed model's accuracy on the whole val set (both workers' shards)
    reported = frame.set_index("epoch")["val_top1"][state["epoch"]]
    assert reported == pytest.approx(val_top1_of(cfg, state["model"]), abs=100 / 360 + 1e-9)  # one image
    # the best model sits in the run's storage (Ray Train's storage_path/name), not in MLflow
    assert result.metrics["best_model_path"] == str(tmp_path / "two-workers" / "best_model.pt")
    assert (tmp_path / "two-workers" / "best_model.pt").is_file()

    # the LR resolved for 2 workers (effective batch 32) reached the workers' schedule: last update k=3 of 4
    lr = 8e-3 * 32 / 256
    assert result.metrics["lr"] == pytest.approx(1e-6 + (lr - 1e-6) * 0.5 * (1 + math.cos(math.pi * 2 / 3)))
    client = MlflowClient(mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("test-ray-2w").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2" and run.data.params["effective_batch"] == "32"
    assert float(run.data.params["resolved_lr"]) == pytest.approx(lr)
    assert run.data.metrics["val_top1"] == pytest.approx(result.metrics["val_top1"])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "best_checkpoint")] == ["best_checkpoint/model.pt"]


def val_top1_of(cfg: FinetuneConfig, weights: dict) -> float:
    """Top-1 (percent) of `weights` on the full digits val set, computed here in one process."""
    from trainers.data import build_datasets
    from trainers.models import build_model

    model, _ = build_model(cfg)
    model.load_state_dict(weights)
    model.eval()
    _, val = build_datasets(cfg)
    loader = torch.utils.data.DataLoader(val, batch_size=120)
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return 100.0 * correct / len(val)


def test_convtune_train_cli(ray_connected, mlflow_server, tmp_path):
    cmd = [sys.executable, "-m", "service.cli", "train", "--ray-address", ray_connected.gcs_address,
           "--cpus-per-worker", "1", "--storage-path", str(tmp_path), "--name", "cli-run",
           "--mlflow-uri", mlflow_server.url, "--experiment", "test-cli-train"]
    for key, value in TINY.items():
        cmd += ["--set", f"{key}={value}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ray_connected.env,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best val_top1" in done.stdout and "epoch   2/2" in done.stderr
    client = MlflowClient(mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("test-cli-train").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id in done.stdout
    assert (tmp_path / "cli-run").is_dir()
    # `convtune train` logs the best model once, at the end
    assert [a.path for a in client.list_artifacts(run.info.run_id, "best_checkpoint")] == ["best_checkpoint/model.pt"]


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "layer_decay=2"], "layer_decay: Input should be less than or equal to 1"),
    (["--set", "dataset=imagefolder", "--set", "data_root=/nonexistent/data", "--set", "num_classes=3"],
     "/nonexistent/data does not exist"),
])
def test_convtune_train_rejects_bad_settings_before_starting_ray(args, message):
    done = subprocess.run([sys.executable, "-m", "service.cli", "train", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_every_process_of_a_run_is_told_where_its_clusters_state_api_is():
    """Train's placement-group cleaner finds the controller through the State API; it must not resolve the
    cluster from /tmp/ray's address file (another Ray on the host: 12 s shutdowns, leaked groups)."""
    from trainers.ray_run import cluster_env

    assert cluster_env("10.0.0.5:6379")["RAY_ADDRESS"] == "10.0.0.5:6379"  # a job's / `--address` cluster
    local = cluster_env(None, "http://127.0.0.1:8300")  # a Ray started here: its dashboard
    assert local["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:8300" and "RAY_ADDRESS" not in local
    assert "RAY_ADDRESS" not in cluster_env("auto") and "RAY_ADDRESS" not in cluster_env("ray://head:10001")
