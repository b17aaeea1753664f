"""Grid and TPE searches through the real Tuner and MLflow: which trials they produce.

The trial function here is a cheap deterministic stand-in for a finetune (the path under test is
spec -> Tune search -> trials -> MLflow; tests/search_spaces/test_sweep_e2e.py runs real finetunes).
"""

from __future__ import annotations

import math
import sys

import pytest
from mlflow.tracking import MlflowClient
from ray import cloudpickle

from search_spaces.driver import run_sweep
from search_spaces.spec import load_spec

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules

BASE = {"model": "convnextv2_atto", "dataset": "digits", "epochs": 2}


def score_trial(config):
    """Reports a score that peaks at blr = 3e-3 and prefers multistep, per epoch."""
    from ray import tune

    blr = config.get("blr", 3e-3)
    from search_spaces.tune_search import grid_values

    bonus = 0.1 if {**config, **grid_values(config)}.get("schedule") == "multistep" else 0.0
    for epoch in (1, 2):
        tune.report({"epoch": epoch, "val_top1": epoch / 2 - abs(math.log10(blr / 3e-3)) / 10 + bonus})


def runs_of(mlflow_url, result):
    client = MlflowClient(mlflow_url)
    parent = client.get_run(result.mlflow_parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, children


def test_grid_runs_every_combination_once(ray_connected, mlflow_server, tmp_path):
    spec = load_spec({
        "name": "grid-test", "base": BASE,
        "space": {
            "schedule": {"type": "choice", "values": ["cosine", "multistep"]},
            "warmup_epochs": {"type": "grid", "values": [0, 1]},
            "milestones": {"type": "choice", "values": [[1], [1.5]], "when": {"schedule": "multistep"}},
        },
        "search": {"algorithm": "grid"}, "scheduler": {"type": "fifo"}, "num_samples": 1,
    })
    result = run_sweep(spec, sweep_id="grid1", storage_path=str(tmp_path), mlflow_uri=mlflow_server.url,
                       trainable=score_trial)
    got = sorted((t["schedule"], t["warmup_epochs"], tuple(t.get("milestones") or ())) for t in result.trials)
    assert got == sorted([("cosine", 0, ()), ("cosine", 1, ()), ("multistep", 0, (1,)), ("multistep", 0, (1.5,)),
                          ("multistep", 1, (1,)), ("multistep", 1, (1.5,))])
    assert result.status == "finished" and result.counts == {"completed": 6}
    assert result.best["params"]["schedule"] == "multistep"
    parent, children = runs_of(mlflow_server.url, result)
    assert parent.info.status == "FINISHED" and len(children) == 6
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["convtune.trial_id"] for c in children} == {t["trial_id"] for t in result.trials}
    artifacts = {a.path for a in MlflowClient(mlflow_server.url).list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "sweep_spec.yaml", "plots", "best"} <= artifacts


def test_warm_start_points_with_a_grid_run_and_the_count_matches(ray_connected, mlflow_server, tmp_path):
    """A warm-start point next to a grid parameter crashed Ray's preset lookup (KeyError); each point takes
    the place of one sample and is one trial, as count_trials says."""
    from search_spaces.spec import count_trials

    spec = load_spec({
        "name": "grid-warm", "base": BASE,
        "space": {"warmup_epochs": {"type": "grid", "values": [0, 1]},
                  "blr": {"type": "loguniform", "low": 1e-4, "high": 1e-1}},
        "search": {"algorithm": "random", "seed": 1,
                   "points_to_evaluate": [{"warmup_epochs": 1, "blr": 3e-3}]},
        "scheduler": {"type": "fifo"}, "num_samples": 2,
    })
    assert count_trials(spec) == 3  # the point, then one more sample crossed with the grid of 2
    result = run_sweep(spec, sweep_id="gridwarm", storage_path=str(tmp_path), mlflow_uri=mlflow_server.url,
                       trainable=score_trial)
    assert result.status == "finished" and len(result.trials) == count_trials(spec)
    assert any(t["warmup_epochs"] == 1 and t["blr"] == pytest.approx(3e-3) for t in result.trials)
    assert sorted(t["warmup_epochs"] for t in result.trials) == [0, 1, 1]


def test_tpe_samples_conditionals_and_warm_starts(ray_connected, mlflow_server, tmp_path):
    spec = load_spec({
        "name": "tpe-test", "base": BASE,
        "space": {
            "blr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
            "schedule": {"type": "choice", "values": ["cosine", "multistep"]},
            "milestones": {"type": "choice", "values": [[1], [1.5]], "when": {"schedule": "multistep"}},
        },
        "search": {"algorithm": "tpe", "seed": 3,
                   "points_to_evaluate": [{"blr": 3e-3, "schedule": "multistep", "milestones": [1]}]},
        "scheduler": {"type": "fifo"}, "num_samples": 6,
    })
    result = run_sweep(spec, sweep_id="tpe1", storage_path=str(tmp_path), mlflow_uri=mlflow_server.url,
                       trainable=score_trial)
    assert len(result.trials) == 6 and result.counts == {"completed": 6}
    for t in result.trials:
        assert 1e-4 <= t["blr"] <= 1e-1
        assert (t.get("milestones") is not None) == (t["schedule"] == "multistep")
    warm = [t for t in result.trials if t["blr"] == 3e-3]
    assert len(warm) == 1 and warm[0]["milestones"] == [1]
    assert result.best["params"]["blr"] == 3e-3  # the warm-start point is the optimum of score_trial
    _, children = runs_of(mlflow_server.url, result)
    assert len(children) == 6 and {c.info.status for c in children} == {"FINISHED"}


def test_stop_at_target_ends_the_sweep_and_leaves_no_open_runs(ray_connected, mlflow_server, tmp_path):
    spec = load_spec({
        "name": "target-test", "base": BASE,
        "space": {"blr": {"type": "grid", "values": [3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5]}},
        "search": {"algorithm": "grid"}, "scheduler": {"type": "fifo"}, "num_samples": 1,
        "stop_at": 0.9, "resources": {"max_concurrent_trials": 1},
    })
    result = run_sweep(spec, sweep_id="target1", storage_path=str(tmp_path), mlflow_uri=mlflow_server.url,
                       trainable=score_trial)
    # the first trial (blr 3e-3) reaches 1.0 at epoch 2: nothing after it is trained
    assert result.status == "finished" and result.best["params"]["blr"] == 3e-3
    assert sum(t["epochs"] for t in result.trials) < 6 * 2
    _, children = runs_of(mlflow_server.url, result)
    assert children and all(c.info.status in ("FINISHED", "KILLED") for c in children)
