"""API throughput and latency under load: GET /v1/sweeps/{id}, /v1/sweeps/{id}/trials, GET /v1/sweeps and
POST /v1/sweeps with 50 concurrent clients and 1,000 stored sweeps of 30 trials each, idle and while a real
sweep trains (and the reconciler syncs it from Ray and MLflow). Every read endpoint is also given as a ratio
to GET /healthz measured on the same server in the same phase: throughput ratio (goal >= 0.7) and p99
ratio (goal <= 1.5), since absolute numbers on a shared 2-core host say little.

Starts its own local stack (`convtune up` in a temporary data folder: Ray head, MLflow, API) unless
--api points at a running one. It starts a Ray head, so on a shared host wrap it in the test lock:

    flock /tmp/convtune-ray-tests.lock .venv/bin/python benchmarks/bench_api.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRAIN_SPEC = {  # the quickstart preset, shortened so it trains for a minute or two
    "name": "bench", "base": {"model": "convnextv2_atto", "dataset": "digits", "input_size": 32, "epochs": 3,
                              "steps_per_epoch_limit": 8, "batch_size": 64},
    "space": {"blr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
    "scheduler": {"type": "fifo"}, "num_samples": 2,
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1},
}


ACTIVE_SPEC = {**TRAIN_SPEC, "name": "bench-active", "num_samples": 4,  # still training when the reads end
               "base": {**TRAIN_SPEC["base"], "epochs": 4, "steps_per_epoch_limit": 16}}


def seed_sweeps(database_url: str, n: int, trials: int) -> list[str]:
    """Store ``n`` finished sweeps of ``trials`` trials each straight into the service's database, as the
    reconciler's final sync leaves them (trial rows with searched params and metrics, best trial on the row)."""
    from service.db import Database
    from service.models import Sweep, SweepStatus, Trial, utcnow

    db = Database(database_url)
    ids = [f"sw-{uuid.uuid4().hex[:12]}" for _ in range(n)]
    spec = json.dumps({**TRAIN_SPEC, "num_samples": trials, "metric": "val_top1", "mode": "max"})
    statuses = [SweepStatus.SUCCEEDED, SweepStatus.FAILED, SweepStatus.STOPPED]
    rng = random.Random(0)
    now = utcnow()
    sweeps, rows = [], []
    for i, sweep_id in enumerate(ids):
        values = [rng.uniform(10, 95) for _ in range(trials)]
        best = max(range(trials), key=values.__getitem__)
        sweeps.append(dict(id=sweep_id, name=f"seeded-{i}", status=statuses[i % 3], spec_json=spec, spec_hash="seed",
                           ray_job_id=sweep_id, total_trials=trials, finished_at=now, created_at=now, updated_at=now,
                           attempt=1, best_trial_id=f"t{best:05d}", best_value=values[best], last_event_id=0))
        for t, value in enumerate(values):
            rows.append(dict(sweep_id=sweep_id, trial_id=f"t{t:05d}", run_id=uuid.uuid4().hex, status="FINISHED",
                             params={"blr": f"{rng.uniform(1e-3, 1e-2):.6g}"}, resolved_lr=1e-4,
                             metrics={"epoch": 3.0, "val_top1": value, "train_loss": 1.2, "lr": 1e-5},
                             epoch=3, latest_metric=value, best_metric=value, outcome="completed",
                             started_at=now, ended_at=now))
    with db.engine.begin() as conn:
        conn.execute(Sweep.__table__.insert(), sweeps)
        conn.execute(Trial.__table__.insert(), rows)
    return ids


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def load(url: str, make_request, clients: int, per_client: int) -> dict:
    latencies: list[float] = []
    errors = dropped = 0

    async def client_loop(http: httpx.AsyncClient):
        nonlocal errors, dropped
        for _ in range(per_client):
            method, path, kwargs = make_request()
            t0 = time.perf_counter()
            try:
                resp = await http.request(method, path, **kwargs)
            except httpx.TransportError:  # e.g. a keep-alive connection the server closed as it was reused
                dropped += 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            errors += resp.status_code >= 400

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"n": len(latencies), "errors": errors, "dropped_connections": dropped, "p50_ms": round(pct(latencies, 50), 1),
            "p99_ms": round(pct(latencies, 99), 1), "mean_ms": round(statistics.fmean(latencies), 1),
            "req_per_s": round(len(latencies) / wall, 1)}


HEALTHZ = "GET /healthz"
READS = ("GET /v1/sweeps/{id}", "GET /v1/sweeps/{id}/trials", "GET /v1/sweeps")
GOAL = {"throughput": 0.7, "p99": 1.5}  # x /healthz, for detail and list


def measure_reads(url: str, ids: list[str], clients: int, per_client: int) -> dict:
    """/healthz, then each read endpoint, then /healthz again (the baseline is their mean: the host's load
    drifts), with the ratios to it."""
    requests = {
        HEALTHZ: lambda: ("GET", "/healthz", {}),
        "GET /v1/sweeps/{id}": lambda: ("GET", f"/v1/sweeps/{random.choice(ids)}", {}),
        "GET /v1/sweeps/{id}/trials": lambda: ("GET", f"/v1/sweeps/{random.choice(ids)}/trials", {}),
        "GET /v1/sweeps": lambda: ("GET", "/v1/sweeps", {"params": {"limit": 50, "offset": random.randrange(0, 950)}}),
    }
    results = {name: asyncio.run(load(url, make, clients, per_client)) for name, make in requests.items()}
    again = asyncio.run(load(url, requests[HEALTHZ], clients, per_client))
    base = {k: (results[HEALTHZ][k] + again[k]) / 2 for k in ("req_per_s", "p99_ms")}
    results[HEALTHZ] = {**results[HEALTHZ], "req_per_s_mean_of_2": round(base["req_per_s"], 1),
                        "p99_ms_mean_of_2": round(base["p99_ms"], 1), "second_run": again}
    ratios = {}
    for name in READS:
        ratios[name] = {"throughput": round(results[name]["req_per_s"] / base["req_per_s"], 2),
                        "p99": round(results[name]["p99_ms"] / base["p99_ms"], 2)}
        if name != "GET /v1/sweeps/{id}/trials":
            ratios[name]["meets_goal"] = (ratios[name]["throughput"] >= GOAL["throughput"]
                                          and ratios[name]["p99"] <= GOAL["p99"])
    results["ratio_to_healthz"] = ratios
    return results


def measure_submits(url: str, n_new: int, n_replays: int, clients: int) -> dict:
    """New submissions start real Ray jobs (cancelled right after); replays hit the Idempotency-Key path."""
    spec = {**TRAIN_SPEC, "name": "bench-submit"}
    if n_new < 1:
        return {}
    with httpx.Client(base_url=url, timeout=120) as http:
        new_ms, ids = [], []
        for i in range(n_new):
            t0 = time.perf_counter()
            resp = http.post("/v1/sweeps", json=spec, headers={"Idempotency-Key": f"bench-{i}-{uuid.uuid4()}"})
            new_ms.append((time.perf_counter() - t0) * 1000)
            resp.raise_for_status()
            ids.append((resp.json()["id"], resp.request.headers["Idempotency-Key"]))
        for sweep_id, _ in ids:
            http.post(f"/v1/sweeps/{sweep_id}/cancel", headers={"Content-Type": "application/json"})
    key = ids[0][1]
    replay = asyncio.run(load(url, lambda: ("POST", "/v1/sweeps", {"json": spec, "headers": {
        "Idempotency-Key": key}}), clients, max(1, n_replays // clients)))
    return {"POST /v1/sweeps (new, starts a Ray job)": {
                "n": n_new, "p50_ms": round(pct(new_ms, 50), 1), "p99_ms": round(pct(new_ms, 99), 1)},
            "POST /v1/sweeps (Idempotency-Key replay)": replay}


def wait_idle(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=30) as http:
        while time.monotonic() < deadline:
            active = http.get("/v1/sweeps", params=[("status", s) for s in
                                                    ("SUBMITTING", "PENDING", "RUNNING", "STOPPING")]).json()
            if active["total"] == 0:
                return
            time.sleep(2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--requests", type=int, default=20, help="requests per client per endpoint (default 20)")
    parser.add_argument("--sweeps", type=int, default=1000, help="stored sweeps (default 1000)")
    parser.add_argument("--trials", type=int, default=30, help="trials per stored sweep (default 30)")
    parser.add_argument("--new-submits", type=int, default=5, help="real submissions to time (default 5; 0: skip "
                        "the submit measurements)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    args = parser.parse_args(argv)

    from service.cli.stack import down, free_port, up

    data_dir = Path(tempfile.mkdtemp(prefix="convtune-bench-"))
    print(f"starting a local stack in {data_dir} ...", flush=True)
    state = up(data_dir, api_port=free_port(), dashboard_port=free_port(), mlflow_port=free_port(),
               ray_port=free_port(), ray_address=None, num_cpus=2, num_gpus=0, quiet=True)
    url = state["api_url"]
    results: dict = {"clients": args.clients, "requests_per_client": args.requests, "stored_sweeps": args.sweeps,
                     "trials_per_sweep": args.trials}
    try:
        ids = seed_sweeps(f"sqlite:///{data_dir / 'convtune.db'}", args.sweeps, args.trials)
        print(f"seeded {len(ids)} sweeps; measuring idle reads ...", flush=True)
        asyncio.run(load(url, lambda: ("GET", f"/v1/sweeps/{ids[0]}", {}), 5, 5))  # warm-up
        results["idle"] = measure_reads(url, ids, args.clients, args.requests)
        print(json.dumps({"idle": results["idle"]["ratio_to_healthz"]}), flush=True)
        if args.new_submits:
            print("measuring submissions ...", flush=True)
            results["submit"] = measure_submits(url, args.new_submits, args.clients * 4, args.clients)
            wait_idle(url)
        print("starting a training sweep and measuring reads while it trains ...", flush=True)
        with httpx.Client(base_url=url, timeout=60) as http:
            training = http.post("/v1/sweeps", json=ACTIVE_SPEC).json()["id"]
            deadline = time.monotonic() + 300
            while http.get(f"/v1/sweeps/{training}").json()["progress"]["running"] < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("the training sweep never started a trial")
                time.sleep(1)
            results["while_training"] = measure_reads(url, ids, args.clients, args.requests)
            print(json.dumps({"while_training": results["while_training"]["ratio_to_healthz"]}), flush=True)
            still = http.get(f"/v1/sweeps/{training}").json()
            results["while_training"]["trials_running_at_end"] = still["progress"]["running"]
            results["while_training"]["training_sweep"] = {
                "id": training, "status": still["status"], "progress": still["progress"],
                "events_so_far": count_events(http, training)}
            http.post(f"/v1/sweeps/{training}/cancel", headers={"Content-Type": "application/json"})
        for endpoint in (HEALTHZ, *READS):
            idle, busy = results["idle"][endpoint], results["while_training"][endpoint]
            results.setdefault("ratio_training_vs_idle", {})[endpoint] = {
                "p50": round(busy["p50_ms"] / idle["p50_ms"], 2), "p99": round(busy["p99_ms"] / idle["p99_ms"], 2)}
        wait_idle(url)
    finally:
        if not args.keep:
            down(data_dir, quiet=True)
    print(json.dumps(results, indent=2))
    for phase in ("idle", "while_training"):
        for name, ratio in results[phase]["ratio_to_healthz"].items():
            print(f"{phase:15s} {name:28s} throughput {ratio['throughput']:.2f}x /healthz   p99 {ratio['p99']:.2f}x"
                  f"   {results[phase][name]['req_per_s']:.0f} req/s, p99 {results[phase][name]['p99_ms']:.0f} ms")
        base = results[phase][HEALTHZ]
        print(f"{phase:15s} {HEALTHZ:28s} {base['req_per_s_mean_of_2']:.0f} req/s, p99 {base['p99_ms_mean_of_2']:.0f} ms "
              "(mean of the runs before and after)")
    return 0


def count_events(http: httpx.Client, sweep_id: str) -> int:
    """How many events the reconciler has stored for the training sweep (read off its stream, then closed)."""
    n, deadline = 0, time.monotonic() + 15
    with http.stream("GET", f"/v1/sweeps/{sweep_id}/events") as resp:
        for line in resp.iter_lines():
            if line.startswith(": heartbeat") or time.monotonic() > deadline:
                break  # caught up: the stream waits for new events
            n += line.startswith("id:")
    return n


if __name__ == "__main__":
    sys.exit(main())
