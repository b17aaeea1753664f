"""Sweep benchmarks: per-trial overhead of the Tune + Train pattern, and ASHA vs FIFO search efficiency.

    .venv/bin/python benchmarks/bench_sweep.py overhead --trials 4          # where a Ray Train trial's time goes
    .venv/bin/python benchmarks/bench_sweep.py overhead --trials 4 --in-process   # the opt-in, for comparison
    .venv/bin/python benchmarks/bench_sweep.py quickstart                   # the quickstart preset's overhead ratio
    .venv/bin/python benchmarks/bench_sweep.py efficiency --trials 8        # ASHA vs FIFO, same budget

Each starts a local Ray (2 CPUs, dashboard on) under the host-wide test lock, then runs real sweeps of
convnextv2_atto on digits through `search_spaces.driver.run_sweep` (every trial a Ray Train run, the
default), logs to a real MLflow store (SQLite) and prints numbers; Ray's start is not part of them. Results and the commands that produced them: docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
LOCK = Path(tempfile.gettempdir()) / "convtune-ray-tests.lock"

from ray.tune import Callback  # noqa: E402


class Timeline(Callback):
    """Driver-side timestamps of every trial: start, each result (with the trainer's epoch_s), end."""

    def __init__(self):
        self.trials: dict[str, dict] = {}

    def __getstate__(self):
        return {"trials": {}}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.trials[trial.trial_id] = {"start": time.time(), "results": [], "end": None}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.trials[trial.trial_id]["results"].append(
            {"t": time.time(), "epoch": result.get("epoch"), "epoch_s": result.get("epoch_s", 0.0),
             "val_top1": result.get("val_top1")})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.trials[trial.trial_id]["end"] = time.time()

    on_trial_error = on_trial_complete


def actor_phases() -> dict[str, list[tuple[float, float, float]]]:
    """(requested, started, ready) times of the trial, Train controller and Train worker actors.

    From the actor-creation tasks of the Ray State API: requested = task created, started = the actor's
    process began ``__init__`` (process start happens before), ready = ``__init__`` done.
    """
    import ray
    from ray.util.state import list_tasks

    out: dict[str, list[tuple[float, float, float]]] = {}
    for task in list_tasks(address=ray.get_runtime_context().gcs_address, detail=True, limit=10_000,
                           filters=[("type", "=", "ACTOR_CREATION_TASK")], raise_on_missing_output=False):
        name = (task.get("func_or_class_name") or task.get("name") or "").split(".")[0]
        created, start, end = task.get("creation_time_ms"), task.get("start_time_ms"), task.get("end_time_ms")
        if created and start and end:
            out.setdefault(name, []).append((created / 1000, start / 1000, end / 1000))
    return {k: sorted(v) for k, v in out.items()}


def base_spec(args, *, name: str, search: dict, scheduler: dict, space: dict, num_samples: int,
              concurrency: int) -> dict:
    return {
        "name": name,
        "base": {"model": "convnextv2_atto", "dataset": "digits", "input_size": 32, "epochs": args.epochs,
                 "steps_per_epoch_limit": args.steps, "batch_size": 64, "warmup_epochs": 0},
        "space": space, "search": search, "scheduler": scheduler, "num_samples": num_samples,
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": concurrency,
                      "in_process": args.in_process},
        "failures": {"trial_retries": 0, "worker_retries": 0},
    }


def run(spec_data: dict, workdir: Path, sweep_id: str):
    from search_spaces.driver import run_sweep
    from search_spaces.spec import load_spec

    timeline = Timeline()
    t0 = time.time()
    result = run_sweep(load_spec(spec_data), sweep_id=sweep_id, storage_path=str(workdir / "state"),
                       mlflow_uri=f"sqlite:///{workdir / 'mlflow.db'}", callbacks=(timeline,))
    return result, timeline, time.time() - t0


def overhead(args, workdir: Path) -> dict:
    values = [round(2e-3 * (1 + i / 10), 6) for i in range(args.trials)]
    spec = base_spec(args, name="bench-overhead", search={"algorithm": "grid"}, scheduler={"type": "fifo"},
                     space={"blr": {"type": "grid", "values": values}}, num_samples=1, concurrency=1)
    result, timeline, wall = run(spec, workdir, "overhead")
    trials = sorted(timeline.trials.values(), key=lambda t: t["start"])
    train_s = sum(r["epoch_s"] for t in trials for r in t["results"])
    steady_s = sum(len(t["results"]) * min(r["epoch_s"] for r in t["results"]) for t in trials if t["results"])
    per_trial = []
    for t in trials:
        res = t["results"]
        startup = res[0]["t"] - t["start"] - res[0]["epoch_s"] if res else float("nan")
        tail = (t["end"] or res[-1]["t"]) - res[-1]["t"] if res else float("nan")
        per_trial.append({"startup_s": startup, "teardown_s": tail,
                          "train_s": sum(r["epoch_s"] for r in res),
                          "span_s": (t["end"] or t["start"]) - t["start"]})
    gaps = [b["start"] - (a["end"] or b["start"]) for a, b in zip(trials, trials[1:], strict=False)]
    phases = actor_phases()
    first_start = trials[0]["start"] if trials else time.time()

    def spans(name):
        return [p for p in phases.get(name, []) if p[0] >= first_start - 5]

    ctrl, workers, drivers = spans("TrainController"), spans("RayTrainWorker"), spans("ImplicitFunc")
    breakdown = {}
    if drivers:  # fewer trial processes than trials: Tune reused a process (reuse_actors)
        breakdown["trial_process_start_s"] = statistics.mean(d[1] - d[0] for d in drivers)
    if len(ctrl) == len(workers) == len(trials) and trials:
        pairs = list(zip(trials, ctrl, workers, strict=True))
        breakdown.update({
            "trial_start_to_controller_requested_s": statistics.mean(c[0] - t["start"] for t, c, _ in pairs),
            "controller_process_start_s": statistics.mean(c[1] - c[0] for _, c, _ in pairs),
            "controller_to_worker_requested_s": statistics.mean(w[0] - c[2] for _, c, w in pairs),
            "worker_process_start_s": statistics.mean(w[1] - w[0] for _, _, w in pairs),
            "worker_ready_to_first_epoch_start_s": statistics.mean(
                t["results"][0]["t"] - t["results"][0]["epoch_s"] - w[2] for t, _, w in pairs if t["results"]),
        })
    elif trials and not ctrl:  # in-process trials: everything happens in the trial process
        breakdown["trial_start_to_first_epoch_start_s"] = statistics.mean(
            t["results"][0]["t"] - t["results"][0]["epoch_s"] - t["start"] for t in trials if t["results"])
    n = len(trials)
    return {
        "trials": n, "epochs": args.epochs, "steps_per_epoch": args.steps, "wall_s": round(wall, 1),
        "sum_train_s": round(train_s, 1), "overhead_per_trial_s": round((wall - train_s) / max(n, 1), 1),
        # the same with every epoch at its trial's fastest epoch: work that slows an epoch down (a first epoch
        # sharing the CPU with background MLflow set-up) counts as overhead here, not as training
        "overhead_per_trial_steady_s": round((wall - steady_s) / max(n, 1), 1),
        "startup_per_trial_s": round(statistics.mean(p["startup_s"] for p in per_trial), 1),
        "teardown_per_trial_s": round(statistics.mean(p["teardown_s"] for p in per_trial), 1),
        "gap_between_trials_s": round(statistics.mean(gaps), 1) if gaps else None,
        "breakdown": {k: round(v, 1) for k, v in breakdown.items()},
        "epoch_s": [[round(r["epoch_s"], 2) for r in t["results"]] for t in trials],
        "trial_processes": len(drivers),
        "actor_counts": {k: len(v) for k, v in phases.items()},
        "status": result.status,
    }


def quickstart(args, workdir: Path) -> dict:
    """The quickstart preset as users run it: sweep wall time over the summed training time of its trials."""
    from search_spaces.spec import resolve_spec_source

    spec = resolve_spec_source("quickstart").model_dump(mode="json")
    if args.in_process:
        spec["resources"]["in_process"] = True
    result, timeline, wall = run(spec, workdir, "quickstart")
    train_s = sum(r["epoch_s"] for t in timeline.trials.values() for r in t["results"])
    return {"trials": len(timeline.trials), "wall_s": round(wall, 1), "sum_train_s": round(train_s, 1),
            "overhead_ratio": round(wall / train_s, 2) if train_s else None,
            "execution": "in_process" if args.in_process else "ray_train",
            "counts": result.counts, "status": result.status}


def efficiency(args, workdir: Path) -> dict:
    space = {"blr": {"type": "loguniform", "low": 2e-4, "high": 3e-2},
             "layer_decay": {"type": "uniform", "low": 0.6, "high": 1.0},
             "schedule": {"type": "choice", "values": ["cosine", "linear", "multistep"]},
             "milestones": {"type": "choice", "values": [[1], [2]], "when": {"schedule": "multistep"}}}
    search = {"algorithm": "random", "seed": args.seed}
    out = {}
    for kind, scheduler in (("fifo", {"type": "fifo"}),
                            ("asha", {"type": "asha", "grace_period": 1, "reduction_factor": 2})):
        result, timeline, wall = run(base_spec(args, name=f"bench-{kind}", search=search, scheduler=scheduler,
                                               space=space, num_samples=args.trials, concurrency=2),
                                     workdir / kind, kind)
        events = sorted((r["t"], r["epoch_s"], r["val_top1"]) for t in timeline.trials.values() for r in t["results"])
        out[kind] = {"wall_s": round(wall, 1), "events": events, "best": max(e[2] for e in events),
                     "epochs": sum(1 for _ in events), "compute_s": sum(e[1] for e in events),
                     "counts": result.counts}
    target = out["fifo"]["best"]
    summary = {"trials": args.trials, "epochs": args.epochs, "fifo_best_top1": round(target, 2)}
    for kind in ("fifo", "asha"):
        spent, reached = 0.0, None
        for epochs, (_, epoch_s, top1) in enumerate(out[kind]["events"], start=1):
            spent += epoch_s
            if top1 >= target and reached is None:
                reached = (round(spent, 1), epochs)
        summary[kind] = {"wall_s": out[kind]["wall_s"], "best_top1": round(out[kind]["best"], 2),
                         "epochs_trained": out[kind]["epochs"], "train_compute_s": round(out[kind]["compute_s"], 1),
                         "compute_to_fifo_best_s": reached[0] if reached else None,
                         "epochs_to_fifo_best": reached[1] if reached else None, "counts": out[kind]["counts"]}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["overhead", "quickstart", "efficiency"])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="steps_per_epoch_limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--in-process", action="store_true",
                        help="the opt-in: trials in the Tune trial process (resources.in_process: true), not Ray Train")
    parser.add_argument("--label", default="", help="printed with the results (e.g. before/after)")
    args = parser.parse_args()
    with open(LOCK, "w") as lock:
        print(f"waiting for {LOCK} ...", file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        import ray

        workdir = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
        from trainers.ray_run import ensure_ray

        ensure_ray(None, num_cpus=args.cpus)  # a local Ray, as `convtune sweep` starts one
        try:
            results = {"overhead": overhead, "quickstart": quickstart, "efficiency": efficiency}[args.mode](args, workdir)
        finally:
            ray.shutdown()
    print(json.dumps({"mode": args.mode, "label": args.label, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
