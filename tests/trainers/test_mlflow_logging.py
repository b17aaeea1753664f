"""Rank 0's MLflow logging, checked by querying a real MLflow server's store."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from testkit import VENV_BIN, RestartableMlflow, stop_process_group, wait_until

from trainers.config import FinetuneConfig
from trainers.loop import LocalReporter, train_loop_per_worker
from trainers.mlflow_logging import absolute_tracking_uri

TINY = FinetuneConfig(input_size=32, batch_size=16, steps_per_epoch_limit=2, epochs=2, warmup_epochs=0.5,
                      layer_decay=0.8, model_ema=True, model_ema_decay=0.9, model_ema_eval=True)


def train(mlflow: dict) -> LocalReporter:
    reporter = LocalReporter()
    train_loop_per_worker({"finetune": TINY.to_dict(), "cpus_per_worker": 2, "mlflow": mlflow}, reporter=reporter)
    return reporter


def test_own_run_holds_params_metrics_and_artifacts(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.url)
    train({"tracking_uri": mlflow_server.url, "experiment_name": "test-train-own", "run_name": "own"})
    exp = client.get_experiment_by_name("test-train-own")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "own"
    params = run.data.params
    assert params["model"] == "convnextv2_atto" and params["layer_decay"] == "0.8"
    assert float(params["resolved_lr"]) == pytest.approx(8e-3 * 16 / 256)
    assert params["updates_per_epoch"] == "2" and params["total_updates"] == "4"
    history = client.get_metric_history(run.info.run_id, "val_top1")
    assert [m.step for m in history] == [1, 2]
    for key in ("train_loss", "val_top5", "val_loss", "lr_min", "lr_max", "images_per_s", "epoch_s",
                "ema_val_top1", "ema_val_loss"):
        assert key in run.data.metrics, key
    assert run.data.metrics["lr_min"] < run.data.metrics["lr_max"]  # layer decay spreads the group LRs
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"param_groups.txt", "param_groups.json", "lr_schedule.png", "best_checkpoint"} <= artifacts
    table = Path(client.download_artifacts(run.info.run_id, "param_groups.txt", str(tmp_path))).read_text()
    assert "layer_0_" in table or "layer_1_" in table
    png = Path(client.download_artifacts(run.info.run_id, "lr_schedule.png", str(tmp_path))).read_bytes()
    assert png.startswith(b"\x89PNG")
    best = client.download_artifacts(run.info.run_id, "best_checkpoint/model.pt", str(tmp_path))
    weights = torch.load(best, map_location="cpu", weights_only=True)
    assert "head.fc.weight" in weights["model"] and weights["model_ema"] is not None


def test_given_run_is_logged_into_and_left_open(mlflow_server):
    client = MlflowClient(mlflow_server.url)
    exp_id = client.create_experiment("test-train-given")
    run = client.create_run(exp_id, run_name="trial-0")
    client.log_param(run.info.run_id, "layer_decay", "0.8")  # a sweep may have logged its parameters already
    train({"tracking_uri": mlflow_server.url, "run_id": run.info.run_id})
    after = client.get_run(run.info.run_id)
    assert after.info.status == "RUNNING"  # the sweep owns the run's end
    assert after.data.metrics["epoch"] == 2 and "val_top1" in after.data.metrics
    assert after.data.params["optimizer"] == "adamw"
    assert len(client.search_runs([exp_id])) == 1


def test_tracking_uris_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert absolute_tracking_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"


@pytest.fixture
def restartable_mlflow(tmp_path):
    server = RestartableMlflow(tmp_path)
    server.start()
    yield server
    stop_process_group(server.proc)


def test_metrics_of_an_mlflow_outage_arrive_once_it_is_back(restartable_mlflow):
    """The real train_loop_per_worker in this process (rank 0's logging is the same under Ray Train, and a
    plain process lets the test stop the server between epochs): the server is down during epochs 2 and 3."""
    server = restartable_mlflow
    events = {}

    class OutageReporter(LocalReporter):
        def __call__(self, metrics, checkpoint_dir):
            super().__call__(metrics, checkpoint_dir)
            if metrics["epoch"] == 1:
                server.stop()
                events["down"] = time.monotonic()
            elif metrics["epoch"] == 3:
                events["trained_while_down"] = time.monotonic() - events["down"]
                server.start()

    cfg = TINY.with_overrides({"epochs": 4, "model_ema": False, "model_ema_eval": False, "dataset": "synthetic",
                               "synthetic_samples": 64})  # 8 val images: the epochs are quick
    reporter = OutageReporter()
    train_loop_per_worker({"finetune": cfg.to_dict(), "cpus_per_worker": 2, "mlflow": {
        "tracking_uri": server.url, "experiment_name": "outage", "outbox": {"retry_s": (0.2, 1.0)}}},
        reporter=reporter)
    # epochs 2 and 3 ran with the server down; one blocking MLflow call alone retries for minutes
    assert events["trained_while_down"] < 60
    client = MlflowClient(server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val_top1")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], pytest.approx(r["val_top1"]))
                                                    for r in reporter.history]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4]
    assert "best_checkpoint" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_an_epochs_metrics_go_ahead_of_set_up_calls():
    """A run's metrics are not held up by the param table, texts and LR plot (deferrable set-up calls)."""
    import threading

    from trainers.mlflow_logging import Call, Outbox

    gate, order = threading.Event(), []
    box = Outbox("http://127.0.0.1:1", retry_s=(0.01, 0.01))
    box.health_url = None  # deliveries below never reach a server

    def call(name, **kw):
        return Call(name, lambda: (gate.wait(10) if name == "params" else None, order.append(name)), **kw)

    box.put(call("params", deferrable=True))  # being delivered (blocked on the gate)
    wait_until(lambda: box.busy, 10, "the first call to be in delivery")
    box.put(call("text", deferrable=True))
    box.put(call("plot", deferrable=True))
    box.put(call("metrics", urgent=True))
    assert [c.what for c in box.pending] == ["params", "metrics", "text", "plot"]  # not ahead of the busy one
    gate.set()
    assert box.flush(10) and order == ["params", "metrics", "text", "plot"]


def test_a_sweep_trials_logger_neither_imports_mlflow_nor_calls_the_server_before_its_first_call():
    code = ("import sys; from trainers.mlflow_logging import RunLogger; "
            "r = RunLogger({'tracking_uri': 'http://127.0.0.1:1', 'run_id': 'abc'}); "
            "assert 'mlflow' not in sys.modules, 'mlflow imported'; assert r.run_id == 'abc'; print('ok')")
    out = subprocess.run([str(VENV_BIN / "python"), "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
