"""`convtune train`: one ConvNeXtV2 finetune on Ray Train, with live progress and a closing summary."""

from __future__ import annotations

import argparse
import os
import sys

EPILOG = """\
examples:
  convtune train                                    # convnextv2_atto on digits, 5 epochs, CPU
  convtune train --set epochs=10 --set layer_decay=0.8 --set schedule=multistep --set milestones=[6,8]
  convtune train finetune.yaml --workers 2 --gpus-per-worker 1
  convtune train --print-config > finetune.yaml     # every setting with its default

Reusing --name (and --storage-path) resumes an interrupted run from its last checkpoint.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="finetune one ConvNeXtV2 on Ray Train (local Ray started when none is given)",
        description=("Finetune a timm ConvNeXtV2 with layer-wise LR decay on Ray Train workers and log it to "
                     "MLflow. Settings come from CONFIG.yaml (optional) and --set overrides; see "
                     "--print-config for all of them and docs/training.md for their meaning."),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="finetune settings (YAML mapping of field: value)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one setting; VALUE is YAML (e.g. --set lr=1e-3 --set milestones=[3,4])")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="Ray Train workers (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per worker (default: 1 if the cluster has GPUs, else 0 = CPU with gloo)")
    p.add_argument("--cpus-per-worker", type=int, default=None, metavar="C",
                   help="CPUs (and torch threads) per worker (default: cluster CPUs / workers, at most 8 with GPUs)")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"), metavar="ADDR",
                   help="existing Ray cluster (default $RAY_ADDRESS; else a local Ray with dashboard is started)")
    p.add_argument("--storage-path", default=None, metavar="DIR",
                   help="where Ray Train keeps checkpoints (default $CONVTUNE_STORAGE_PATH or ~/.convtune/runs)")
    p.add_argument("--name", default=None, help="run name (default finetune-<model>-<time>); reuse it to resume")
    p.add_argument("--mlflow-uri", default=None, metavar="URI",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--experiment", default="convtune-train", help="MLflow experiment (default convtune-train)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--max-failures", type=int, default=0, metavar="K",
                   help="restart failed workers from the last checkpoint up to K times (default 0)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")
    p.set_defaults(handler=run_train)


def load_config(path: str | None, overrides: list[str]):
    from trainers.config import FinetuneConfig, parse_override

    base = FinetuneConfig.from_file(path) if path else FinetuneConfig()
    return base.with_overrides(dict(parse_override(o) for o in overrides)) if overrides else base


def run_train(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from trainers.config import format_validation_error
    from trainers.data import DataError, check_data

    try:
        cfg = load_config(args.config, args.overrides)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        print(f"convtune train: invalid settings\n{format_validation_error(exc)}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.workers < 1:
        print("convtune train: --workers must be >= 1", file=sys.stderr)
        return 2

    try:
        check_data(cfg, world_size=args.workers)  # data, batch and schedule, before any cluster starts
    except DataError as exc:
        print(f"convtune train: {exc}", file=sys.stderr)
        return 2

    import ray

    from trainers.mlflow_logging import absolute_tracking_uri
    from trainers.ray_run import ensure_ray, run_finetune

    mlflow = None if args.no_mlflow else {"tracking_uri": absolute_tracking_uri(args.mlflow_uri),
                                          "experiment_name": args.experiment}
    print(f"convtune train: {cfg.model} on {cfg.dataset}, {cfg.epochs} epochs, {args.workers} worker(s)",
          file=sys.stderr)
    started, dashboard = ensure_ray(args.ray_address)
    if dashboard:
        print(f"Ray dashboard: {dashboard}", file=sys.stderr)
    gpus = args.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= args.workers else 0.0
    progress = ProgressBar(cfg.epochs)
    try:
        result = run_finetune(cfg, num_workers=args.workers, gpus_per_worker=gpus,
                              cpus_per_worker=args.cpus_per_worker, storage_path=args.storage_path,
                              name=args.name, mlflow=mlflow, max_failures=args.max_failures,
                              on_progress=progress.update)
    except DataError as exc:
        progress.close()
        print(f"convtune train: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors; show the cause, not a traceback
        progress.close()
        print(f"convtune train: training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    progress.close()
    print_summary(result, mlflow)
    return 0


class ProgressBar:
    """A tqdm bar over the whole run (epoch + fraction of the epoch) and one line per finished epoch."""

    def __init__(self, epochs: int):
        from tqdm import tqdm

        self.epochs = epochs
        self.bar = tqdm(total=epochs, unit="epoch", dynamic_ncols=True, file=sys.stderr,
                        bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
        self.bar.set_description("starting workers")

    def _move_to(self, position: float) -> None:
        self.bar.update(max(position - self.bar.n, 0))

    def update(self, item: dict) -> None:
        if item.get("kind") == "step":
            self.bar.set_description(f"epoch {item['epoch'] + 1}/{self.epochs}")
            self.bar.set_postfix_str(f"loss {item['loss']:.3f} lr {item['lr']:.2e}")
            self._move_to(round(item["epoch"] + item["micro"] / max(item["of"], 1), 3))
        elif item.get("kind") == "epoch":
            epoch = int(item["epoch"])
            self.bar.set_description(f"epoch {min(epoch + 1, self.epochs)}/{self.epochs}")
            self._move_to(epoch)
            ema = f"  ema_top1 {item['ema_val_top1']:.2f}" if "ema_val_top1" in item else ""
            self.bar.write(f"epoch {epoch:>3}/{self.epochs}  train_loss {item['train_loss']:.4f}  "
                           f"val_top1 {item['val_top1']:.2f}  val_top5 {item['val_top5']:.2f}  "
                           f"val_loss {item['val_loss']:.4f}{ema}  lr {item['lr_max']:.2e}  "
                           f"{item['images_per_s']:.0f} img/s  {item['epoch_s']:.1f} s", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def print_summary(result, mlflow: dict | None) -> None:
    lines = ["", f"finished {result.name} in {result.seconds:.0f} s"]
    if result.best_val_top1 is not None:
        lines.append(f"  best val_top1  {result.best_val_top1:.2f}% (epoch {result.best_epoch})")
    if result.history:
        last = result.history[-1]
        lines.append(f"  last epoch     val_top1 {last['val_top1']:.2f}%  val_loss {last['val_loss']:.4f}")
    if result.best_checkpoint:
        lines.append(f"  checkpoint     {result.best_checkpoint}")
    lines.append(f"  run directory  {result.run_dir}")
    if result.mlflow_run_id:
        uri = result.mlflow_tracking_uri or ""
        lines.append(f"  MLflow run     {result.mlflow_run_id} ({uri})")
        if uri.startswith("http"):
            lines.append(f"                 {uri.rstrip('/')}/#/experiments/{result.mlflow_experiment_id}/runs/{result.mlflow_run_id}")
        else:
            lines.append(f"                 view with: mlflow ui --backend-store-uri {uri}")
    print("\n".join(lines))
