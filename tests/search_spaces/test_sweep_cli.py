"""`convtune sweep` without a cluster: dry run, presets, schema, spec errors and their exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from service.cli import main


def test_dry_run_of_a_preset_prints_trials_samples_and_estimate(capsys):
    assert main(["sweep", "quickstart", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trials: 6" in out and "PFLOPs" in out
    assert "time: unknown" in out and "--probe" in out  # no hours without a measured speed
    assert out.count("\n    ") == 5  # five sampled configurations
    assert "sample configurations" in out


def test_spec_errors_exit_2_and_name_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "space": {"layer_decay": {"type": "uniform", "low": 0.5,
                                                                              "high": 1.5}}}))
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "space.layer_decay.high" in err and "(0, 1]" in err


def test_unknown_preset_or_missing_file(capsys):
    assert main(["sweep", "no_such_thing.yaml", "--dry-run"]) == 2
    assert "no such spec file" in capsys.readouterr().err


def test_list_presets_and_schema(capsys):
    assert main(["sweep", "--list-presets"]) == 0
    assert {"quickstart", "convnextv2_layer_decay"} <= set(capsys.readouterr().out.split())
    assert main(["sweep", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "convtune sweep spec" and "space" in schema["properties"]


def test_help_mentions_every_option():
    out = subprocess.run([sys.executable, "-m", "service.cli", "sweep", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for option in ("--dry-run", "--resume", "--sweep-id", "--storage-path", "--mlflow-uri", "--ray-address"):
        assert option in out


def test_driver_entrypoint_rejects_bad_specs_before_touching_ray(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "space": {"lr_typo": {"type": "choice", "values": [1]}}}))
    proc = subprocess.run([sys.executable, "-m", "search_spaces.driver", "--spec", str(bad), "--sweep-id", "x",
                           "--storage-path", str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "space.lr_typo" in proc.stderr
    assert not (tmp_path / "s").exists()
