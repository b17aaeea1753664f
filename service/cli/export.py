"""`convtune export ID [--to DIR]`: download a sweep's best model and its finetune config.

The service API says where the sweep's MLflow run is (its `links.mlflow`); the files come from MLflow
directly, which already serves artifacts (proxied by the tracking server), so model weights never
pass through the API. A sweep with `register_model` exports its registered model version: the MLflow
model (`mlflow_model/`, loadable with `mlflow.pytorch.load_model`) and the best-model file beside it.
Any other finished sweep exports the best trial's checkpoint that the driver logged to its run.
Either way `DIR/finetune_config.yaml` and a weights file that `convtune train --set checkpoint=...`
loads end up in DIR.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

CONFIG_YAML = "finetune_config.yaml"


@dataclass
class Exported:
    weights: Path
    config: Path
    model_uri: str | None  # models:/NAME/VERSION when the sweep registered its winner

    def train_command(self) -> str:
        return f"convtune train {self.config} --set checkpoint={self.weights}"


def parse_mlflow_link(link: str) -> tuple[str, str]:
    """`http://host:5000/#/experiments/1/runs/abc` -> ("http://host:5000", "abc")."""
    base, _, fragment = link.partition("#")
    if "/runs/" not in fragment:
        raise ValueError(f"not an MLflow run link: {link}")
    return base.rstrip("/"), fragment.split("/runs/", 1)[1].split("/")[0]


def export_run(tracking_uri: str, run_id: str, dest: Path) -> Exported:
    """Download the best model of the sweep whose MLflow parent run is ``run_id`` into ``dest``."""
    import mlflow.artifacts
    import yaml
    from mlflow.tracking import MlflowClient

    from search_spaces.registry import BEST_MODEL_FILE, CONFIG_FILE, TAG_NAME, TAG_VERSION

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    tags = client.get_run(run_id).data.tags
    dest.mkdir(parents=True, exist_ok=True)
    if tags.get(TAG_VERSION):
        model_uri = f"models:/{tags[TAG_NAME]}/{tags[TAG_VERSION]}"
        model_dir = dest / "mlflow_model"
        shutil.rmtree(model_dir, ignore_errors=True)
        source = client.get_model_version_download_uri(tags[TAG_NAME], tags[TAG_VERSION])  # (models:/ would
        with tempfile.TemporaryDirectory(dir=dest) as tmp:  # resolve through the global registry URI)
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri)
            shutil.move(local, model_dir)
        weights = dest / BEST_MODEL_FILE
        shutil.copyfile(model_dir / "extra_files" / BEST_MODEL_FILE, weights)
        config = json.loads((model_dir / "extra_files" / CONFIG_FILE).read_text())
        (dest / CONFIG_YAML).write_text(yaml.safe_dump(config, sort_keys=False))
        return Exported(weights, dest / CONFIG_YAML, model_uri)
    if "convtune.best_trial_id" not in tags:
        raise FileNotFoundError(f"MLflow run {run_id} has no best trial yet (the sweep has not finished)")
    best = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="best", dst_path=str(dest),
                                                    tracking_uri=tracking_uri))
    state = best / "checkpoint" / "train_state.pt"
    if not state.is_file():
        raise FileNotFoundError(f"MLflow run {run_id} holds no best checkpoint (best/checkpoint/train_state.pt)")
    weights = dest / "train_state.pt"
    shutil.move(state, weights)
    shutil.move(best / "finetune_config.yaml", dest / CONFIG_YAML)
    shutil.rmtree(best, ignore_errors=True)
    return Exported(weights, dest / CONFIG_YAML, None)


def run_export(args) -> int:
    from service.cli.client import Api, ApiError

    try:
        detail = Api(args.api, args.token).get(f"/v1/sweeps/{args.id}")
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    link = (detail.get("links") or {}).get("mlflow")
    if not link:
        print(f"error: {args.id} has no MLflow run yet (status {detail['status']})", file=sys.stderr)
        return 1
    base, run_id = parse_mlflow_link(link)
    tracking_uri = args.mlflow_uri or base
    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        print(f"error: cannot reach MLflow at {tracking_uri!r}; pass --mlflow-uri", file=sys.stderr)
        return 1
    dest = Path(args.to or args.id).expanduser().resolve()
    print(f"downloading the best model of {args.id} from {tracking_uri} (run {run_id}) to {dest} ...", flush=True)
    try:
        out = export_run(tracking_uri, run_id, dest)
    except (FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - MLflow's errors, as one line
        print(f"error: MLflow: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if out.model_uri:
        print(f"  registered model {out.model_uri} -> {dest / 'mlflow_model'}")
    print(f"  weights: {out.weights}\n  config:  {out.config}")
    print(f"train from it: {out.train_command()}")
    return 0


def register(subparsers) -> None:
    from service.cli.client import _common

    p = subparsers.add_parser(
        "export", help="Download a sweep's best model (registered version or best checkpoint) and its config",
        description="Download the best model of a finished sweep and its finetune config from MLflow, in a "
                    "form `convtune train CONFIG --set checkpoint=WEIGHTS` loads.")
    p.add_argument("id", help="sweep id")
    p.add_argument("--to", metavar="DIR", default=None, help="destination folder (default: ./<sweep id>)")
    p.add_argument("--mlflow-uri", default=None, metavar="URI",
                   help="MLflow tracking server (default: the one the sweep's MLflow link points to)")
    _common(p)
    p.set_defaults(handler=run_export)
