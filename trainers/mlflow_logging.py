"""MLflow logging from rank 0 of a finetune.

The run is either given (`{"run_id": ...}`: a sweep created the child run driver-side and owns its end)
or created here (`{"experiment_name": ...}`) and ended by `finish`. Metrics go out as one
`MlflowClient.log_batch` call per epoch. Tracking URIs must be absolute or remote before the workers
start, because Ray Train workers change directory (`absolute_tracking_uri`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "convtune-train"
MAX_PARAM_LEN = 6000


def absolute_tracking_uri(uri: str | None = None) -> str:
    """`uri` (else $MLFLOW_TRACKING_URI, else ./mlflow.db) with relative paths made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if "://" not in uri:  # a bare path: a file store folder
        return Path(uri).expanduser().resolve().as_uri()
    scheme, rest = uri.split("://", 1)
    if scheme == "sqlite" and rest.startswith("/") and not rest.startswith("//"):
        # sqlite:///relative.db has one slash before a relative path; sqlite:////abs.db has two
        return f"sqlite:///{Path(rest[1:]).expanduser().resolve()}"
    if scheme == "file" and not rest.startswith("/"):
        return Path(rest).expanduser().resolve().as_uri()
    return uri


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            out[name] = text[:MAX_PARAM_LEN]
    return out


def plot_lr_schedule(path: Path, schedule, groups: list[dict[str, Any]], title: str) -> Path:
    """Every group's LR over the run's updates (groups with equal lr_scale share a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = schedule.total_steps
    steps = sorted(set(range(0, total, max(total // 1000, 1))) | {total - 1})
    base = [schedule.lr_at(s) for s in steps]
    by_scale: dict[float, list[str]] = {}
    for g in groups:
        by_scale.setdefault(g["lr_scale"], []).append(g["name"])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for scale, names in sorted(by_scale.items(), reverse=True):
        label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1})"
        ax.plot(steps, [b * scale for b in base], label=f"{label}  x{scale:.3g}", linewidth=1.2)
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    if len(by_scale) <= 16:
        ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class RunLogger:
    """Rank 0's MLflow run for one finetune."""

    def __init__(self, settings: dict[str, Any]):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = absolute_tracking_uri(settings.get("tracking_uri"))
        self.client = MlflowClient(self.tracking_uri)
        self.owns_run = not settings.get("run_id")
        if self.owns_run:
            name = settings.get("experiment_name") or DEFAULT_EXPERIMENT
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            tags = {k: str(v) for k, v in (settings.get("tags") or {}).items()}
            run = self.client.create_run(exp_id, run_name=settings.get("run_name"), tags=tags)
            self.run_id = run.info.run_id
            self.experiment_id = exp_id
        else:
            self.run_id = settings["run_id"]
            self.experiment_id = self.client.get_run(self.run_id).info.experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log the resolved config; keys the run already holds (a sweep may log them) are skipped."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        flat = {k: v for k, v in flatten_params(params).items() if k not in existing}
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow's per-batch param limit
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)]
        self.client.log_batch(self.run_id, metrics=items)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_setup(self, *, params: dict[str, Any], groups: list[dict[str, Any]], schedule, model_name: str) -> None:
        """Params, the param-group table and the LR schedule plot, once at the start."""
        from trainers.param_groups import group_summaries, param_group_table

        self.log_params(params)
        self.log_text(param_group_table(groups), "param_groups.txt")
        self.log_text(json.dumps(group_summaries(groups), indent=1), "param_groups.json")
        with tempfile.TemporaryDirectory() as tmp:
            plot = plot_lr_schedule(Path(tmp) / "lr_schedule.png", schedule, groups,
                                    f"{model_name}: {schedule.name}, base lr {schedule.base_lr:.3g}")
            self.log_artifact(plot)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run if this logger created it; a sweep's run is ended by the sweep."""
        if self.owns_run:
            self.client.set_terminated(self.run_id, status)
