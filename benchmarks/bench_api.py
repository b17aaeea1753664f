"""API latency under load: p50/p99 of GET /v1/sweeps/{id}, GET /v1/sweeps and POST /v1/sweeps with
50 concurrent clients and 1,000 stored sweeps, idle and while a sweep trains (ratio = training/idle).

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


def seed_sweeps(database_url: str, n: int) -> list[str]:
    """Store ``n`` finished sweeps straight into the service's database."""
    from service.db import Database
    from service.models import Sweep, SweepStatus, utcnow

    db = Database(database_url)
    ids = [f"sw-{uuid.uuid4().hex[:12]}" for _ in range(n)]
    spec = json.dumps({**TRAIN_SPEC, "metric": "val_top1", "mode": "max"})
    statuses = [SweepStatus.SUCCEEDED, SweepStatus.FAILED, SweepStatus.STOPPED]
    with db.session() as s:
        for i, sweep_id in enumerate(ids):
            s.add(Sweep(id=sweep_id, name=f"seeded-{i}", status=statuses[i % 3], spec_json=spec, spec_hash="seed",
                        ray_job_id=sweep_id, total_trials=2, finished_at=utcnow()))
        s.commit()
    return ids


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def load(url: str, make_request, clients: int, per_client: int) -> dict:
    latencies: list[float] = []
    errors = 0

    async def client_loop(http: httpx.AsyncClient):
        nonlocal errors
        for _ in range(per_client):
            method, path, kwargs = make_request()
            t0 = time.perf_counter()
            resp = await http.request(method, path, **kwargs)
            latencies.append((time.perf_counter() - t0) * 1000)
            errors += resp.status_code >= 400

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"n": len(latencies), "errors": errors, "p50_ms": round(pct(latencies, 50), 1),
            "p99_ms": round(pct(latencies, 99), 1), "mean_ms": round(statistics.fmean(latencies), 1),
            "req_per_s": round(len(latencies) / wall, 1)}


def measure_reads(url: str, ids: list[str], clients: int, per_client: int) -> dict:
    detail = asyncio.run(load(url, lambda: ("GET", f"/v1/sweeps/{random.choice(ids)}", {}), clients, per_client))
    listing = asyncio.run(load(url, lambda: ("GET", "/v1/sweeps", {"params": {
        "limit": 50, "offset": random.randrange(0, 950)}}), clients, per_client))
    return {"GET /v1/sweeps/{id}": detail, "GET /v1/sweeps": listing}


def measure_submits(url: str, n_new: int, n_replays: int, clients: int) -> dict:
    """New submissions start real Ray jobs (cancelled right after); replays hit the Idempotency-Key path."""
    spec = {**TRAIN_SPEC, "name": "bench-submit"}
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
    parser.add_argument("--new-submits", type=int, default=5, help="real submissions to time (default 5)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    args = parser.parse_args(argv)

    from service.cli.stack import down, free_port, up

    data_dir = Path(tempfile.mkdtemp(prefix="convtune-bench-"))
    print(f"starting a local stack in {data_dir} ...", flush=True)
    state = up(data_dir, api_port=free_port(), dashboard_port=free_port(), mlflow_port=free_port(),
               ray_port=free_port(), ray_address=None, num_cpus=2, num_gpus=0, quiet=True)
    url = state["api_url"]
    results: dict = {"clients": args.clients, "requests_per_client": args.requests, "stored_sweeps": args.sweeps}
    try:
        ids = seed_sweeps(f"sqlite:///{data_dir / 'convtune.db'}", args.sweeps)
        print(f"seeded {len(ids)} sweeps; measuring idle reads ...", flush=True)
        asyncio.run(load(url, lambda: ("GET", f"/v1/sweeps/{ids[0]}", {}), 5, 5))  # warm-up
        results["idle"] = measure_reads(url, ids, args.clients, args.requests)
        print("measuring submissions ...", flush=True)
        results["submit"] = measure_submits(url, args.new_submits, args.clients * 4, args.clients)
        wait_idle(url)
        print("starting a training sweep and measuring reads while it trains ...", flush=True)
        with httpx.Client(base_url=url, timeout=60) as http:
            training = http.post("/v1/sweeps", json=TRAIN_SPEC).json()["id"]
            deadline = time.monotonic() + 300
            while http.get(f"/v1/sweeps/{training}").json()["progress"]["running"] < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("the training sweep never started a trial")
                time.sleep(1)
            results["while_training"] = measure_reads(url, ids, args.clients, args.requests)
            still = http.get(f"/v1/sweeps/{training}").json()
            results["while_training"]["trials_running_at_end"] = still["progress"]["running"]
            http.post(f"/v1/sweeps/{training}/cancel", headers={"Content-Type": "application/json"})
        for endpoint in ("GET /v1/sweeps/{id}", "GET /v1/sweeps"):
            idle, busy = results["idle"][endpoint], results["while_training"][endpoint]
            results.setdefault("ratio_training_vs_idle", {})[endpoint] = {
                "p50": round(busy["p50_ms"] / idle["p50_ms"], 2), "p99": round(busy["p99_ms"] / idle["p99_ms"], 2)}
        wait_idle(url)
    finally:
        if not args.keep:
            down(data_dir, quiet=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
