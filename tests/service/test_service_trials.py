"""How a trial's MLflow run becomes a stored row and events (service.trials): pure functions, no servers."""

from __future__ import annotations

from service.mlflow_reader import TrialRecord
from service.trials import best_trial, merge, trial_values

SPACE = {"blr", "layer_decay"}


def record(status="RUNNING", epoch=None, value=None, **metrics) -> dict:
    if epoch is not None:
        metrics = {"epoch": float(epoch), "val_top1": value, **metrics}
    run = TrialRecord("t1", "r1", status, {"blr": "0.004", "layer_decay": "0.9", "resolved_lr": "0.0005",
                                           "optimizer": "adamw", "epochs": "3"}, metrics, 1_000, 2_000)
    return trial_values(run, SPACE, "val_top1")


def kinds(events):
    return [kind for kind, _ in events]


def test_only_the_searched_params_are_kept_with_the_resolved_lr():
    row = record(epoch=1, value=40.0)
    assert row["params"] == {"blr": "0.004", "layer_decay": "0.9"} and row["resolved_lr"] == 0.0005
    assert row["epoch"] == 1 and row["latest_metric"] == 40.0 and row["outcome"] is None and row["ended_at"] is None


def test_a_trial_seen_for_the_first_time_already_ended_gets_every_event_in_order():
    row, events = merge(None, record("FINISHED", 3, 70.0, best_val_top1=75.0), "max")
    assert kinds(events) == ["trial_started", "trial_result", "trial_ended"]
    assert events[2][1] == {"trial_id": "t1", "outcome": "completed", "status": "FINISHED", "epoch": 3,
                            "best_metric": 75.0}
    assert row["best_metric"] == 75.0


def test_pending_trials_make_no_event_until_they_start():
    pending, events = merge(None, record("PENDING"), "max")
    assert events == []
    _, events = merge(pending, record("RUNNING"), "max")
    assert kinds(events) == ["trial_started"]


def test_an_older_read_never_moves_a_trial_back_nor_repeats_an_event():
    ended, _ = merge(None, record("FINISHED", 3, 70.0), "max")
    stale, events = merge(ended, record("RUNNING", 2, 60.0), "max")  # another worker's earlier MLflow read
    assert events == [] and stale["status"] == "FINISHED" and stale["epoch"] == 3 and stale["latest_metric"] == 70.0


def test_the_best_so_far_follows_the_mode_until_the_driver_logs_it():
    first, _ = merge(None, record("RUNNING", 1, 30.0), "min")
    second, events = merge(first, record("RUNNING", 2, 50.0), "min")
    assert kinds(events) == ["trial_result"] and second["best_metric"] == 30.0
    assert best_trial([{**second, "trial_id": "a"}, {**first, "trial_id": "b", "latest_metric": 20.0}],
                      "min")["trial_id"] == "b"


def test_a_resumed_trial_starts_again():
    killed, _ = merge(None, record("KILLED", 1, 30.0), "max")
    _, events = merge(killed, record("RUNNING", 1, 30.0), "max")
    assert kinds(events) == ["trial_started"]
