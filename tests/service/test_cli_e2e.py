"""The client against the real service: `submit --watch` (one line per event off a terminal), the
registered winner in `status`, and `export` loaded back by `convtune train`'s loader. One 1-trial sweep."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import mlflow.pytorch
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from service.cli.train import load_config
from trainers.models import build_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def convtune(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def test_submit_watch_then_export_the_registered_winner(api_process, tiny_spec, mlflow_server, tmp_path):
    api = api_process().start()
    name = f"convtune-cli-{uuid.uuid4().hex[:6]}"
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump({**tiny_spec, "num_samples": 1, "register_model": name}))
    env = {**os.environ, "CONVTUNE_API_URL": api.url}

    sub = convtune("submit", str(spec_file), "--watch", env=env)
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    sweep_id = sub.stdout.split("submitted: ", 1)[1].split(" ", 1)[0]
    events = sub.stdout.split("convtune watch", 1)[1].splitlines()[1:]
    started = [line for line in events if " started " in line]
    assert len(started) == 1 and {w.split("=")[0] for w in started[0].split()[3:]} == {"blr", "layer_decay"}
    trial_id = started[0].split()[1]
    assert f"trial {trial_id} completed after epoch 2  best val_top1=" in sub.stdout
    assert events[-1].startswith(f"sweep {sweep_id} SUCCEEDED  best: {trial_id}  val_top1=")
    assert " lr=" in events[-1] and "optimizer=" not in events[-1]

    # the driver registered the winner: parent run tagged (and ended FINISHED), version tagged
    client = MlflowClient(mlflow_server.url)
    parent = client.search_runs([client.get_experiment_by_name("convtune-tiny").experiment_id],
                                f"tags.`convtune.sweep_id` = '{sweep_id}' and tags.`convtune.kind` = 'sweep'")[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["registered_model_name"] == name and parent.data.tags["registered_model_version"] == "1"
    version = client.get_model_version(name, "1")
    assert version.run_id == parent.info.run_id
    assert version.tags["sweep_id"] == sweep_id and version.tags["trial_id"] == trial_id
    assert float(version.tags["metric_value"]) == pytest.approx(float(parent.data.metrics["best_val_top1"]))

    # the sweep detail shows the version, from the service's database (stored by the final sync)
    detail = httpx.get(f"{api.url}/v1/sweeps/{sweep_id}", timeout=30).json()
    assert detail["model_name"] == name and detail["model_version"] == "1"
    assert detail["best_trial"]["trial_id"] == trial_id and set(detail["best_trial"]["params"]) == {"blr", "layer_decay"}
    status = convtune("status", sweep_id, env=env)
    assert f"registered model version: 1 (`convtune export {sweep_id}`)" in status.stdout, status.stdout
    assert "has no event stream" not in sub.stderr, "submit --watch must read the event stream, not fall back to polling"

    out_dir = tmp_path / "best"
    exported = convtune("export", sweep_id, "--to", str(out_dir), env=env)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert f"models:/{name}/1" in exported.stdout
    assert f"convtune train {out_dir / 'finetune_config.yaml'} --set checkpoint={out_dir / 'best_model.pt'}" \
        in exported.stdout
    cfg = load_config(str(out_dir / "finetune_config.yaml"), [f"checkpoint={out_dir / 'best_model.pt'}"])
    model, report = build_model(cfg)
    assert report is not None and not report.missing
    registered = mlflow.pytorch.load_model(str(out_dir / "mlflow_model"))
    x = torch.randn(2, 3, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), registered(x), atol=1e-5)
