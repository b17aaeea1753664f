"""The sweep winner in the MLflow Model Registry, and `convtune export` of it, on the real MLflow server.

A real tiny model is trained once in this process (1 epoch x 2 steps at 32 px); registration, export
and the `checkpoint=` round trip then run against the session MLflow server (SQLite store, which is
database-backed and so has the registry).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import mlflow.pytorch
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from search_spaces.registry import TAG_ERROR, TAG_NAME, TAG_VERSION, best_model_file, register_winner
from search_spaces.spec import SweepSpec
from search_spaces.tracking import SweepTracking, log_sweep_summary
from service.cli.export import export_run, parse_mlflow_link
from service.cli.train import load_config
from trainers.checkpoints import TRAIN_STATE_FILE
from trainers.config import FinetuneConfig
from trainers.loop import LocalReporter, train_loop_per_worker
from trainers.models import build_model

TINY = {"model": "convnextv2_atto", "dataset": "digits", "input_size": 32, "batch_size": 16, "epochs": 1,
        "steps_per_epoch_limit": 2, "warmup_epochs": 0, "model_ema": True}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(finetune config dict, best dict as the driver builds it) of one real tiny finetune."""
    cfg = FinetuneConfig.model_validate(TINY)
    root = tmp_path_factory.mktemp("trained")
    reporter = LocalReporter(root / "checkpoints")
    train_loop_per_worker({"finetune": cfg.to_dict(), "cpus_per_worker": 1, "output_dir": str(root / "out")},
                          reporter=reporter)
    best = {"trial_id": "abc_00001", "metric": reporter.history[-1]["val_top1"], "params": {"blr": 1e-3},
            "finetune": cfg.model_dump(mode="json"), "checkpoint_path": str(reporter.checkpoints[-1]),
            "best_model_path": reporter.history[-1]["best_model_path"], "mlflow_run_id": None}
    return best


def make_tracking(url: str, register: str | None) -> tuple[SweepSpec, SweepTracking]:
    spec = SweepSpec.model_validate({"name": "reg", "base": TINY, "space": {"blr": {"type": "choice",
                                     "values": [1e-3]}}, "register_model": register})
    tracking = SweepTracking(url, spec, f"sw-{uuid.uuid4().hex[:8]}")
    tracking.open_parent(resume=False)
    return spec, tracking


def trained_weights(best) -> dict[str, torch.Tensor]:
    return torch.load(f"{best['checkpoint_path']}/{TRAIN_STATE_FILE}", weights_only=True)["model"]


def test_weights_come_from_the_best_model_file_else_the_checkpoint(trained, tmp_path):
    path, source = best_model_file(trained, tmp_path)
    assert source == trained["best_model_path"] and Path(source).name == "best_model.pt"
    from_file = torch.load(path, weights_only=True)
    gone = {**trained, "best_model_path": str(tmp_path / "ended-with-the-trial" / "best_model.pt")}
    (tmp_path / "fallback").mkdir()
    path, source = best_model_file(gone, tmp_path / "fallback")
    assert source == trained["checkpoint_path"]
    from_ckpt = torch.load(path, weights_only=True)
    assert json.loads(from_ckpt["config"]) == trained["finetune"]
    for key in ("model", "model_ema"):  # one epoch: the best epoch is the checkpointed one
        assert from_ckpt[key].keys() == from_file[key].keys()
        assert all(torch.equal(from_ckpt[key][k], from_file[key][k]) for k in from_file[key])


def test_spec_rejects_a_bad_registry_name():
    with pytest.raises(ValueError, match="register_model"):
        SweepSpec.model_validate({"name": "x", "space": {"blr": {"type": "choice", "values": [1e-3]}},
                                  "register_model": "no spaces/allowed"})


def test_winner_is_registered_and_exports_for_train(mlflow_server, trained, tmp_path):
    name = f"convtune-test-{uuid.uuid4().hex[:6]}"
    spec, tracking = make_tracking(mlflow_server.url, name)
    client = MlflowClient(mlflow_server.url)

    assert register_winner(tracking, spec, trained, final=False) is None  # interrupted sweeps register nothing
    version = register_winner(tracking, spec, trained, final=True)
    tracking.finish_parent("FINISHED")
    assert version == "1"
    tags = client.get_run(tracking.parent_run_id).data.tags
    assert tags[TAG_NAME] == name and tags[TAG_VERSION] == "1"
    mv = client.get_model_version(name, "1")
    assert mv.tags["sweep_id"] == tracking.sweep_id and mv.tags["trial_id"] == "abc_00001"
    assert mv.tags["metric"] == "val_top1" and float(mv.tags["metric_value"]) == pytest.approx(trained["metric"])

    # the registered model is the trained one: same outputs as the checkpoint's weights, with a signature
    mlflow.set_tracking_uri(mlflow_server.url)
    loaded = mlflow.pytorch.load_model(f"models:/{name}/1")  # torch.export program, exported in eval mode
    reference, _ = build_model(FinetuneConfig.model_validate(TINY))
    reference.load_state_dict(trained_weights(trained))
    x = torch.randn(3, 3, 32, 32)  # another batch size than the example's
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference.eval()(x), atol=1e-5)
    info = mlflow.models.get_model_info(f"models:/{name}/1")
    assert info.signature is not None and info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, 32, 32)

    # a second finished sweep with the same name is a new version
    spec2, tracking2 = make_tracking(mlflow_server.url, name)
    assert register_winner(tracking2, spec2, trained, final=True) == "2"
    tracking2.finish_parent("FINISHED")

    # export (the files `convtune export` writes) and `convtune train --set checkpoint=...`'s loader
    out = export_run(mlflow_server.url, tracking.parent_run_id, tmp_path / "export")
    assert out.model_uri == f"models:/{name}/1"
    assert (tmp_path / "export" / "mlflow_model" / "MLmodel").is_file()
    # the PyTorch flavour with its input example, and the finetune config (and checkpoint) beside the model
    model_dir = tmp_path / "export" / "mlflow_model"
    assert "pytorch" in info.flavors and info.saved_input_example_info is not None
    assert [p.name for p in model_dir.rglob("finetune_config.json")] and [p.name for p in model_dir.rglob("best_model.pt")]
    cfg = load_config(str(out.config), [f"checkpoint={out.weights}"])
    assert cfg.model == "convnextv2_atto" and cfg.input_size == 32 and cfg.model_ema
    model, report = build_model(cfg)
    assert report is not None and report.layout == "timm" and not report.missing
    for key, value in trained_weights(trained).items():
        assert torch.equal(model.state_dict()[key], value), key


def test_without_registry_export_takes_the_logged_best_checkpoint(mlflow_server, trained, tmp_path):
    spec, tracking = make_tracking(mlflow_server.url, None)
    assert register_winner(tracking, spec, trained, final=True) is None
    with pytest.raises(FileNotFoundError, match="no best trial"):
        export_run(mlflow_server.url, tracking.parent_run_id, tmp_path / "early")
    table = pd.DataFrame([{"trial_id": trained["trial_id"], "blr": 1e-3, "best_val_top1": trained["metric"]}])
    log_sweep_summary(tracking, spec, table, {}, trained)
    tracking.finish_parent("FINISHED")
    assert TAG_VERSION not in MlflowClient(mlflow_server.url).get_run(tracking.parent_run_id).data.tags

    out = export_run(mlflow_server.url, tracking.parent_run_id, tmp_path / "export")
    assert out.model_uri is None
    model, report = build_model(load_config(str(out.config), [f"checkpoint={out.weights}"]))
    assert report is not None and not report.missing
    for key, value in trained_weights(trained).items():
        assert torch.equal(model.state_dict()[key], value), key


def test_failed_registration_is_tagged_and_never_raises(mlflow_server, trained):
    spec, tracking = make_tracking(mlflow_server.url, f"convtune-test-{uuid.uuid4().hex[:6]}")
    missing = {**trained, "checkpoint_path": None, "best_model_path": None}
    assert register_winner(tracking, spec, missing, final=True) is None
    tags = MlflowClient(mlflow_server.url).get_run(tracking.parent_run_id).data.tags
    assert "no checkpoint" in tags[TAG_ERROR] and TAG_VERSION not in tags
    tracking.finish_parent("FINISHED")


def test_mlflow_links_parse():
    assert parse_mlflow_link("http://h:5000/#/experiments/3/runs/abc123") == ("http://h:5000", "abc123")
    with pytest.raises(ValueError):
        parse_mlflow_link("http://h:5000/")

