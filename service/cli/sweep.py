"""`convtune sweep`: run a sweep locally (no service), with a live trial table and a closing summary."""

from __future__ import annotations

import argparse
import os
import sys
import time

EPILOG = """\
examples:
  convtune sweep quickstart --dry-run          # a preset: what would run, sample configs, CPU-hours
  convtune sweep quickstart                    # digits + convnextv2_atto, a few minutes on 2 CPUs
  convtune sweep my_sweep.yaml --sweep-id ld1  # Ctrl-C stops it with its state saved ...
  convtune sweep my_sweep.yaml --resume ld1    # ... and this continues it
  convtune sweep --list-presets
  convtune sweep --schema > sweep.schema.json  # JSON Schema of the spec, for editors

Spec format and every key: docs/sweeps.md.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a hyperparameter sweep locally (Ray Tune over Ray Train finetunes, logged to MLflow)",
        description=("Run a sweep spec (YAML/JSON file or preset name) as a Ray Tune search whose trials are "
                     "Ray Train finetunes, without the service. A local Ray is started when none is given. "
                     "Running an existing sweep id again resumes it."),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", nargs="?", metavar="SPEC", help="spec file (.yaml/.json) or preset name")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the trial count, five sampled configs and a compute estimate; run nothing")
    p.add_argument("--probe", action="store_true",
                   help="with --dry-run: time a few training steps of the spec's model here (this machine's GPU, "
                   "else its CPUs) so the estimate has hours, not only FLOPs; run it on a node like the cluster's")
    p.add_argument("--resume", metavar="ID", default=None, help="resume the saved sweep ID (fails if none)")
    p.add_argument("--sweep-id", metavar="ID", default=None, help="id of a new sweep (default <name>-<time>)")
    p.add_argument("--storage-path", metavar="DIR",
                   default=os.environ.get("CONVTUNE_STORAGE_PATH") or os.path.expanduser("~/.convtune/sweeps"),
                   help="sweep state and checkpoints (default $CONVTUNE_STORAGE_PATH or ~/.convtune/sweeps)")
    p.add_argument("--mlflow-uri", metavar="URI", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--ray-address", metavar="ADDR", default=os.environ.get("RAY_ADDRESS"),
                   help="existing Ray cluster (default $RAY_ADDRESS; else a local Ray with dashboard)")
    p.add_argument("--refresh", type=float, default=10.0, metavar="S", help="live table refresh, seconds")
    p.add_argument("--list-presets", action="store_true", help="list the bundled presets and exit")
    p.add_argument("--schema", action="store_true", help="print the spec's JSON Schema and exit")
    p.set_defaults(handler=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    import json

    from search_spaces.spec import (
        SpecError,
        dry_run,
        format_dry_run,
        list_presets,
        resolve_spec_source,
        spec_json_schema,
    )

    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    if args.schema:
        print(json.dumps(spec_json_schema(), indent=2))
        return 0
    if not args.spec:
        print("error: give a SPEC file or preset name (see --list-presets)", file=sys.stderr)
        return 2
    try:
        spec = resolve_spec_source(args.spec)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.dry_run:
        cluster = _cluster_if_reachable(args.ray_address)
        speed = None
        if args.probe:
            from search_spaces.spec import trial_finetune
            from trainers.probe import images_per_second

            print("probing training speed (a few steps of the spec's model) ...", file=sys.stderr, flush=True)
            speed = images_per_second(trial_finetune(spec, {}), threads=spec.resources.threads_per_worker)
            print(f"measured {speed:.1f} images/s per worker", file=sys.stderr)
        print(format_dry_run(dry_run(spec, *cluster, images_per_second=speed)))
        return 0

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    from search_spaces.driver import SweepNotFoundError, ensure_ray, run_sweep
    from search_spaces.progress import LiveTable
    from trainers.data import DataError
    from trainers.mlflow_logging import absolute_tracking_uri

    sweep_id = args.resume or args.sweep_id or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    mlflow_uri = absolute_tracking_uri(args.mlflow_uri)
    print(f"sweep {sweep_id}: {spec.search.algorithm} search over {', '.join(spec.space)}; "
          f"state in {os.path.join(args.storage_path, sweep_id)}; MLflow {mlflow_uri}", flush=True)
    ensure_ray(args.ray_address)
    try:
        result = run_sweep(spec, sweep_id=sweep_id, storage_path=args.storage_path, mlflow_uri=mlflow_uri,
                           resume=bool(args.resume), callbacks=(LiveTable(spec, every_s=args.refresh),))
    except (SpecError, SweepNotFoundError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(result, spec, args.spec))
    return {"finished": 0, "interrupted": 130}.get(result.status, 1)


def _cluster_if_reachable(address: str | None):
    """Cluster resources for the dry run: the given cluster's, else this machine's."""
    if address:
        import ray

        ray.init(address=address, log_to_driver=False)
        try:
            return ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        finally:
            ray.shutdown()
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        pass
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}, None


def format_summary(result, spec, source: str = "<SPEC>") -> str:
    counts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(result.counts.items()))
    lines = [f"sweep {result.sweep_id} {result.status} in {result.wall_s / 60:.1f} min: "
             f"{len(result.trials)} trials ({counts})"]
    if result.best:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in result.best["params"].items())
        lines.append(f"  best {spec.metric}: {result.best['metric']:.4f} (trial {result.best['trial_id']}): {params}")
        if result.best.get("checkpoint_path"):
            lines.append(f"  best checkpoint: {result.best['checkpoint_path']}")
    lines.append(f"  MLflow: {result.mlflow_url}")
    if result.status == "interrupted":
        lines.append(f"  resume with: convtune sweep {source} --resume {result.sweep_id}")
    return "\n".join(lines)
