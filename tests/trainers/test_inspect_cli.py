"""`convtune param-groups` and `convtune schedule`, run as a user would (the installed console script)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.schedules import build_epoch_schedule

CONVTUNE = shutil.which("convtune", path=str(Path(sys.executable).parent))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CONVTUNE, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    assert "param-groups" in out.stdout and "schedule" in out.stdout


def test_param_groups_table():
    out = run("param-groups", "convnextv2_atto", "--layer-decay", "0.8", "--layer-decay-type", "group")
    assert out.returncode == 0, out.stderr
    assert "14 groups" in out.stdout
    assert out.stdout.splitlines()[1].split() == ["group", "layer", "tensors", "params", "lr_scale", "wd"]


def test_param_groups_json_records():
    out = run("param-groups", "convnextv2_atto", "--layer-decay", "0.8", "--weight-decay", "0.3",
              "--no-weight-decay", "head.fc.*", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    params = {r["name"]: r for r in data["params"]}
    assert len(params) == 140 and set(next(iter(params.values()))) == {"name", "layer_id", "lr_scale", "weight_decay"}
    assert params["stem.0.weight"] == {"name": "stem.0.weight", "layer_id": 1, "lr_scale": pytest.approx(0.8 ** 12),
                                       "weight_decay": 0.3}
    assert params["head.fc.weight"]["weight_decay"] == 0.0
    # head.fc.* exempt: layer 13 has no decayed tensor left, so 25 groups instead of 26
    assert len(data["groups"]) == 25 and sum(g["tensors"] for g in data["groups"]) == 140


@pytest.mark.parametrize("args,message", [
    (["param-groups", "convnextv2_attoo"], "unknown timm model 'convnextv2_attoo'; did you mean convnextv2_atto"),
    (["param-groups", "convnextv2_atto", "--layer-decay", "1.5"], "layer_decay must be in (0, 1]"),
    (["param-groups", "resnet18", "--layer-decay", "0.7"], "families with a rule"),
    (["schedule", "cosine", "--warmup-epochs", "12", "--epochs", "10"], "not shorter than training"),
    (["schedule", "multistep", "--milestones", "8", "3"], "strictly increasing"),
])
def test_bad_input_errors(args, message):
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr


def test_unknown_schedule_lists_choices():
    out = run("schedule", "cosinee")
    assert out.returncode == 2 and "cosine_restarts" in out.stderr


def test_schedule_json_and_plot(tmp_path):
    png = tmp_path / "lr.png"
    out = run("schedule", "cosine_restarts", "--lr", "0.01", "--epochs", "6", "--steps-per-epoch", "5",
              "--warmup-steps", "3", "--cycles", "2", "--json", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    values = json.loads(out.stdout)
    want = build_epoch_schedule("cosine_restarts", base_lr=0.01, epochs=6, updates_per_epoch=5, warmup_steps=3, cycles=2)
    assert values == want.values()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_schedule_table_output():
    out = run("schedule", "half_cosine", "--warmup-epochs", "2", "--epochs", "12", "--steps-per-epoch", "10")
    assert out.returncode == 0
    assert "120 updates, warmup 20" in out.stdout
