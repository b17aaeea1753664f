"""The best model: a small file in the run's storage, reported as best_model_path; MLflow gets it once, at the
end, and only for a run of its own (a sweep trial's run gets none: the sweep driver logs the sweep's best)."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from trainers.checkpoints import read_model_weights
from trainers.config import FinetuneConfig, format_validation_error
from trainers.loop import LocalReporter, train_loop_per_worker
from trainers.mlflow_logging import RunLogger

TINY = FinetuneConfig(input_size=32, batch_size=16, steps_per_epoch_limit=2, epochs=2, warmup_epochs=0.5)


def train(mlflow: dict, output_dir, reporter: LocalReporter | None = None) -> list[dict]:
    reporter = reporter or LocalReporter()
    train_loop_per_worker({"finetune": TINY.to_dict(), "cpus_per_worker": 2, "mlflow": mlflow,
                           "output_dir": str(output_dir)}, reporter=reporter)
    return reporter.history


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


def test_sweep_trial_run_gets_no_model_upload_but_reports_the_best_model_path(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.url)
    run = client.create_run(client.create_experiment("test-best-trial"), run_name="trial-0")
    history = train({"tracking_uri": mlflow_server.url, "run_id": run.info.run_id}, tmp_path)
    assert "best_checkpoint" not in artifacts(client, run.info.run_id)  # before: uploaded on every improvement
    last = history[-1]
    assert last["best_model_path"] == str(tmp_path / "best_model.pt")
    assert read_model_weights(last["best_model_path"])["epoch"] == last["best_epoch"]


def test_own_run_logs_the_best_model_once_at_the_end(mlflow_server, tmp_path, monkeypatch):
    client = MlflowClient(mlflow_server.url)
    reporter, uploads = LocalReporter(), []  # uploads: (artifact path, epochs reported before the upload)
    real_log_artifact = RunLogger.log_artifact

    def log_artifact(self, path, artifact_path=None):  # records, then uploads as usual
        uploads.append((artifact_path, len(reporter.history)))
        return real_log_artifact(self, path, artifact_path)

    monkeypatch.setattr(RunLogger, "log_artifact", log_artifact)
    history = train({"tracking_uri": mlflow_server.url, "experiment_name": "test-best-own"}, tmp_path, reporter)
    # one upload, after the first epoch's report: the first epoch always improves the best, and before the
    # fix it was uploaded then (and again on every later improvement, to the same artifact path)
    assert [u for u in uploads if u[0] == "best_checkpoint"] == [("best_checkpoint", TINY.epochs - 1)]
    (run,) = client.search_runs([client.get_experiment_by_name("test-best-own").experiment_id])
    assert artifacts(client, run.info.run_id, "best_checkpoint") == {"best_checkpoint/model.pt"}
    logged = read_model_weights(client.download_artifacts(run.info.run_id, "best_checkpoint/model.pt",
                                                          str(tmp_path / "dl")))
    best = max(history, key=lambda m: m["val_top1"])
    assert logged["epoch"] == best["epoch"] == history[-1]["best_epoch"]
    on_disk = read_model_weights(history[-1]["best_model_path"])
    assert all(torch.equal(v, on_disk["model"][k]) for k, v in logged["model"].items())


def test_best_metric_must_be_a_reported_metric():
    with pytest.raises(ValidationError) as bad_name:
        FinetuneConfig(best_metric="accuracy")
    assert format_validation_error(bad_name.value).startswith("best_metric: unknown metric 'accuracy'; choose one "
                                                               "of val_top1, val_top5, val_loss")
    with pytest.raises(ValidationError, match="best_metric: ema_val_top1 needs model_ema=true and model_ema_eval"):
        FinetuneConfig(best_metric="ema_val_top1", model_ema=True)
    assert FinetuneConfig(best_metric="val_loss", best_mode="min").best_mode == "min"
