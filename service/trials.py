"""The service's copy of a sweep's trials, and the events a change in them makes.

Pure functions: :func:`trial_values` turns an MLflow trial run into a ``trials`` row (the searched
params only, the latest metrics, epoch, latest/best objective value, outcome); :func:`merge` compares
it with the stored row and returns the row to store and the events (``trial_started``,
``trial_result``, ``trial_ended``) the change means; :func:`best_trial` picks the sweep's best row.
``SweepService.sync_trials`` applies them in one transaction.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from service.mlflow_reader import TrialRecord

ENDED = {"FINISHED": "completed", "STOPPED_EARLY": "early_stopped", "FAILED": "failed", "KILLED": "cancelled"}
"""Trial status -> the ``outcome`` of its ``trial_ended`` event."""
STATUS_RANK = {"PENDING": 0, "RUNNING": 1}  # any ended status ranks 2: a stale read never moves a trial back


def ms_to_datetime(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if ms else None


def number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def trial_values(record: TrialRecord, space: set[str], metric: str) -> dict[str, Any]:
    """The ``trials`` row of one MLflow trial run (``space``: the params the spec searches)."""
    metrics = {k: v for k, v in record.metrics.items() if math.isfinite(v)}  # JSON has no NaN (PostgreSQL refuses it)
    epoch = metrics.get("epoch")
    return {
        "trial_id": record.trial_id, "run_id": record.run_id, "status": record.status,
        "params": {k: v for k, v in record.params.items() if k in space},
        "resolved_lr": number(record.params.get("resolved_lr")),
        "metrics": metrics, "epoch": int(epoch) if epoch is not None else None,
        "latest_metric": metrics.get(metric), "best_metric": metrics.get(f"best_{metric}"),
        "outcome": ENDED.get(record.status), "started_at": ms_to_datetime(record.start_time),
        "ended_at": ms_to_datetime(record.end_time) if record.status in ENDED else None,
    }


def merge(old: dict[str, Any] | None, new: dict[str, Any], mode: str) -> tuple[dict[str, Any], list[tuple[str, dict]]]:
    """The row to store and the events between the stored row ``old`` (None: first seen) and ``new``.

    Two reconcilers (two API workers) may read MLflow at different moments: a read older than the
    stored row never moves a trial back (epoch, or from ended to running), so no event repeats."""
    rank = STATUS_RANK.get
    if old is not None:
        reopened = old["status"] in ENDED and new["status"] == "RUNNING" and (new["epoch"] or 0) >= (old["epoch"] or 0)
        if not reopened and rank(new["status"], 2) < rank(old["status"], 2):
            new = {**new, "status": old["status"], "outcome": old["outcome"], "ended_at": old["ended_at"]}
        if (new["epoch"] or 0) < (old["epoch"] or 0):
            new = {**new, "epoch": old["epoch"], "metrics": old["metrics"], "latest_metric": old["latest_metric"]}
    if new["best_metric"] is None:  # the driver logs best_<metric> when the trial ends; until then: the best seen
        seen = [v for v in (old and old["best_metric"], new["latest_metric"]) if v is not None]
        new = {**new, "best_metric": (max if mode == "max" else min)(seen) if seen else None}

    events: list[tuple[str, dict]] = []
    tid = new["trial_id"]
    resumed = old is not None and old["status"] in ENDED and new["status"] == "RUNNING"
    if new["status"] != "PENDING" and (old is None or old["status"] == "PENDING" or resumed):
        events.append(("trial_started", {"trial_id": tid, "params": new["params"], "lr": new["resolved_lr"]}))
    if new["epoch"] is not None and (old is None or (old["epoch"] or 0) < new["epoch"]):
        events.append(("trial_result", {"trial_id": tid, "epoch": new["epoch"], "metrics": new["metrics"]}))
    if new["status"] in ENDED and (old is None or old["status"] != new["status"]):
        events.append(("trial_ended", {"trial_id": tid, "outcome": new["outcome"], "status": new["status"],
                                       "epoch": new["epoch"], "best_metric": new["best_metric"]}))
    return new, events


def best_trial(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The trial with the best latest objective value (what Tune ranks by, and the registry registers)."""
    scored = [r for r in rows if r["latest_metric"] is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r["latest_metric"])


def best_summary(row: dict[str, Any] | None, metric: str) -> dict[str, Any] | None:
    """The best trial as a ``sweep`` event carries it: searched params and the resolved LR only."""
    if row is None:
        return None
    return {"trial_id": row["trial_id"], "metric": metric, "value": row["latest_metric"], "params": row["params"],
            "lr": row["resolved_lr"]}
