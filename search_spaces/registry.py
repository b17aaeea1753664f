"""The sweep's winner in the MLflow Model Registry (``register_model: NAME`` in the sweep spec).

At the end of a finished sweep the driver calls :func:`register_winner`: the best trial's weights are
loaded into a fresh timm model, logged as an MLflow PyTorch model (signature, input example) in the
sweep's parent run, with the best-model file (``best_model.pt``: weights, EMA weights, config; what
``convtune train --set checkpoint=...`` loads) and the finetune config (``finetune_config.json``) as
extra files beside it, and registered as a new version of NAME. The version is tagged with the sweep
id, trial id, metric and value; the parent run gets the tags ``registered_model_name`` and
``registered_model_version`` (the service shows the latter as ``model_version``).

Where the weights come from is one function, :func:`best_model_file`: the trial's best-model file
(``best_model_path``, written by rank 0 when the metric improved), else its checkpoint. A failed registration (e.g. an
MLflow store without a registry) is logged and tagged ``registered_model_error`` on the parent run; it
never fails a sweep whose trials finished.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TAG_NAME = "registered_model_name"
TAG_VERSION = "registered_model_version"
TAG_ERROR = "registered_model_error"
MODEL_NAME = "model"  # the logged model's name in the parent run
BEST_MODEL_FILE = "best_model.pt"
CONFIG_FILE = "finetune_config.json"


def best_model_file(best: dict[str, Any], out_dir: Path) -> tuple[Path, str]:
    """Put the winner's best-model file (``save_model_weights`` layout) into ``out_dir``: (path, source).

    Source: the file the trial's rank 0 wrote when its metric last improved (``best_model_path``, on
    any pyarrow filesystem), when it still exists; else the best trial's checkpoint (``checkpoint_path``,
    a ``train_state.pt`` holding model, optimizer and EMA state), e.g. for in-process trials, whose
    best-model file lives in a temporary directory that ends with the trial.
    """
    import torch
    from pyarrow import fs as pafs
    from ray.tune import Checkpoint

    from trainers.checkpoints import TRAIN_STATE_FILE

    path = out_dir / BEST_MODEL_FILE
    reported = best.get("best_model_path")
    if reported:
        filesystem, fs_path = pafs.FileSystem.from_uri(reported if "://" in reported else f"file://{reported}")
        if filesystem.get_file_info(fs_path).type == pafs.FileType.File:
            pafs.copy_files(fs_path, str(path), source_filesystem=filesystem)
            return path, reported
    source = best.get("checkpoint_path")
    if not source:
        raise FileNotFoundError(f"trial {best['trial_id']} left no best-model file and no checkpoint to register")
    with Checkpoint(str(source)).as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    ema = state.get("model_ema")
    if ema is not None:  # ModelEmaV3's own state dict wraps the model as `module.`
        ema = {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}
    torch.save({"model": state["model"], "model_ema": ema, "config": json.dumps(best["finetune"]),
                "epoch": state["epoch"]}, path)
    return path, str(source)


def reported_best_model(results, trial_id: str) -> str | None:
    """``best_model_path`` of the trial's last result in a Tune ResultGrid, if it reported one."""
    for result in results or ():
        metrics = result.metrics or {}
        if metrics.get("trial_id") == trial_id:
            return metrics.get("best_model_path")
    return None


def register_winner(tracking, spec, best: dict[str, Any] | None, *, final: bool, results=None) -> str | None:
    """Register the best trial of a finished sweep as a new version of ``spec.register_model``.

    ``results`` (the sweep's ResultGrid) supplies the trial's reported ``best_model_path``. Returns the
    version, or None when nothing was registered (no name, no best trial, an interrupted sweep, or an
    error, which is logged and tagged on the parent run).
    """
    if not (spec.register_model and best and final):
        return None
    try:
        if not best.get("best_model_path"):
            best = {**best, "best_model_path": reported_best_model(results, best["trial_id"])}
        return _register(tracking, spec, best)
    except Exception as exc:  # noqa: BLE001 - the sweep's results stand; the error is on the run
        log.warning("could not register the best model as %r", spec.register_model, exc_info=True)
        try:
            tracking.client.set_tag(tracking.parent_run_id, TAG_ERROR, f"{type(exc).__name__}: {exc}"[:500])
        except Exception:  # noqa: BLE001
            log.warning("could not tag the registration error on the parent run", exc_info=True)
        return None


def _register(tracking, spec, best: dict[str, Any]) -> str:
    import mlflow
    import mlflow.pytorch
    import timm
    import torch
    from mlflow.models import infer_signature

    from trainers.config import FinetuneConfig
    from trainers.models import build_model

    cfg = FinetuneConfig.model_validate({**best["finetune"], "pretrained": False, "checkpoint": None})
    with tempfile.TemporaryDirectory(prefix="convtune-register-") as tmp:
        tmp = Path(tmp)
        weights, source = best_model_file(best, tmp)
        saved = torch.load(weights, map_location="cpu", weights_only=True)
        use_ema = spec.metric.startswith("ema_") and saved.get("model_ema")
        model, _ = build_model(cfg)  # the architecture only: no hub download, no start checkpoint
        model.load_state_dict(saved["model_ema"] if use_ema else saved["model"])
        model.eval()
        # pt2 (torch.export, no pickled code) keeps the batch dimension dynamic only for a batch > 1
        example = torch.zeros(2, 3, cfg.input_size, cfg.input_size)
        with torch.no_grad():
            signature = infer_signature(example.numpy(), model(example).numpy())
        config_file = tmp / CONFIG_FILE
        config_file.write_text(json.dumps(best["finetune"], indent=2))
        mlflow.set_tracking_uri(tracking.tracking_uri)
        with mlflow.start_run(run_id=tracking.parent_run_id):  # the caller ends the parent run afterwards
            info = mlflow.pytorch.log_model(
                model, name=MODEL_NAME, signature=signature, input_example=example.numpy(), serialization_format="pt2",
                extra_files=[str(weights), str(config_file)],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"],
                params={"trial_id": best["trial_id"], "weights": "ema" if use_ema else "model", "source": source})
    version = mlflow.register_model(info.model_uri, spec.register_model, tags={
        "sweep_id": tracking.sweep_id, "trial_id": best["trial_id"], "metric": spec.metric,
        "metric_value": repr(float(best["metric"]))})
    tracking.client.update_model_version(
        spec.register_model, version.version,
        description=f"best trial {best['trial_id']} of sweep {tracking.sweep_id}: {spec.metric}={best['metric']:.6g}")
    tracking.client.set_tag(tracking.parent_run_id, TAG_NAME, spec.register_model)
    tracking.client.set_tag(tracking.parent_run_id, TAG_VERSION, str(version.version))
    log.info("registered the best model of sweep %s as %s version %s", tracking.sweep_id, spec.register_model,
             version.version)
    return str(version.version)
