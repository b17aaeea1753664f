"""`convtune up|down|demo|serve`: the local stack, the product's embedded default.

`up` starts a Ray head (dashboard and Jobs API on), an MLflow server (SQLite store, local
artifacts) and the API, each in its own process group with its log and state in one data folder
(default ~/.convtune). `down` stops exactly those processes. `demo` is the main job end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from service.cli.common import STATE_FILE, read_state, stack_data_dir

SERVICES = ("ray", "mlflow", "api")


def write_state(data_dir: Path, state: dict) -> None:
    tmp = data_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(data_dir / STATE_FILE)


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - local URLs we started
            return resp.status == 200
    except OSError:
        return False


def wait_for(url: str, proc: subprocess.Popen, what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {log}")
        if http_ok(url):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f}s; see {log}")


def bin_path(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def launch(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)  # own process group: `down` stops it and its children


def stop_group(pid: int, what: str, grace: float = 30.0) -> None:
    """SIGTERM the process group we started, then SIGKILL what is left after ``grace`` seconds."""
    if not alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # reap it if this process started it (demo, benchmark)
            os.waitpid(pid, os.WNOHANG)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.3)
    print(f"  {what} did not stop in {grace:.0f}s; killing it", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def base_env() -> dict:
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")  # a local stack on loopback; pinned so ~/.ray/auth_token can't flip it
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def up(data_dir: Path, *, api_port: int, dashboard_port: int, mlflow_port: int, ray_port: int,
       ray_address: str | None, num_cpus: int | None, num_gpus: int | None, quiet: bool = False) -> dict:
    """Start whatever of the stack is not running yet; return the state (URLs and pids)."""
    say = (lambda *_: None) if quiet else (lambda msg: print(msg, flush=True))
    data_dir.mkdir(parents=True, exist_ok=True)
    state = read_state(data_dir) or {}
    env = base_env()
    logs = data_dir / "logs"

    if ray_address:
        state["ray"] = {"pid": None, "url": ray_address.rstrip("/"), "external": True}
    elif not alive(state.get("ray", {}).get("pid")):
        if not port_free(dashboard_port):
            raise RuntimeError(f"port {dashboard_port} is taken: another Ray dashboard? pass --dashboard-port, or "
                               f"--ray-address http://127.0.0.1:{dashboard_port} to use that cluster")
        say(f"starting Ray head (dashboard/Jobs API on :{dashboard_port}) ...")
        cmd = [bin_path("ray"), "start", "--head", "--block", f"--port={ray_port}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
               f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus}")
        if num_gpus is not None:
            cmd.append(f"--num-gpus={num_gpus}")
        proc = launch(cmd, logs / "ray.log", env)
        url = f"http://127.0.0.1:{dashboard_port}"
        state["ray"] = {"pid": proc.pid, "url": url, "external": False}
        write_state(data_dir, state)
        wait_for(f"{url}/api/version", proc, "Ray", logs / "ray.log", 180)
    else:
        say(f"Ray already running ({state['ray']['url']})")

    if not alive(state.get("mlflow", {}).get("pid")):
        say(f"starting MLflow server on :{mlflow_port} ...")
        store = data_dir / "mlflow"
        store.mkdir(parents=True, exist_ok=True)
        cmd = [bin_path("mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
               "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1",
               "--port", str(mlflow_port), "--workers", "1"]
        proc = launch(cmd, logs / "mlflow.log", env)
        url = f"http://127.0.0.1:{mlflow_port}"
        state["mlflow"] = {"pid": proc.pid, "url": url}
        write_state(data_dir, state)
        wait_for(f"{url}/health", proc, "MLflow", logs / "mlflow.log", 180)
    else:
        say(f"MLflow already running ({state['mlflow']['url']})")

    if not alive(state.get("api", {}).get("pid")):
        say(f"starting the convtune API on :{api_port} ...")
        api_env = {**env, "CONVTUNE_DATA_DIR": str(data_dir), "CONVTUNE_RAY_ADDRESS": state["ray"]["url"],
                   "CONVTUNE_MLFLOW_TRACKING_URI": state["mlflow"]["url"], "CONVTUNE_PORT": str(api_port)}
        api_env.setdefault("CONVTUNE_HOST", "127.0.0.1")
        proc = launch([sys.executable, "-m", "service.cli", "serve"], logs / "api.log", api_env)
        url = f"http://127.0.0.1:{api_port}"
        state["api"] = {"pid": proc.pid, "url": url}
        state["api_url"] = url
        write_state(data_dir, state)
        wait_for(f"{url}/readyz", proc, "the convtune API", logs / "api.log", 120)
    else:
        say(f"API already running ({state['api']['url']})")
    return state


def down(data_dir: Path, quiet: bool = False) -> bool:
    state = read_state(data_dir)
    if not state:
        if not quiet:
            print(f"no stack running from {data_dir}")
        return False
    for name in reversed(SERVICES):  # the API first: nothing new is submitted while the rest stops
        entry = state.get(name) or {}
        if entry.get("pid") and not entry.get("external"):
            if not quiet:
                print(f"stopping {name} (pid {entry['pid']}) ...", flush=True)
            stop_group(entry["pid"], name)
    (data_dir / STATE_FILE).unlink(missing_ok=True)
    if not quiet:
        print("stack stopped")
    return True


def _stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="state folder (default: $CONVTUNE_DATA_DIR or ~/.convtune)")
    p.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard / Jobs API port (default 8265)")
    p.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port (default 5000)")
    p.add_argument("--ray-port", type=int, default=6379, help="Ray GCS port (default 6379)")
    p.add_argument("--ray-address", default=None,
                   help="use this running Ray cluster's Jobs API (e.g. http://head:8265) instead of starting one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs the Ray head offers (default: all)")


def _up_kwargs(args) -> dict:
    return dict(api_port=args.port, dashboard_port=args.dashboard_port, mlflow_port=args.mlflow_port,
                ray_port=args.ray_port, ray_address=args.ray_address, num_cpus=args.num_cpus,
                num_gpus=args.num_gpus)


def run_up(args) -> int:
    data_dir = stack_data_dir(args.data_dir)
    try:
        state = up(data_dir, **_up_kwargs(args))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("stopping what was started ...", file=sys.stderr)
        down(data_dir, quiet=True)
        return 1
    print(f"\nconvtune is up (state and logs in {data_dir})")
    print(f"  API:    {state['api']['url']}   (docs: {state['api']['url']}/docs)")
    print(f"  MLflow: {state['mlflow']['url']}")
    print(f"  Ray:    {state['ray']['url']}")
    print("next: convtune submit quickstart --watch      stop: convtune down")
    return 0


def run_down(args) -> int:
    down(stack_data_dir(args.data_dir))
    return 0


def run_serve(args) -> int:
    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)
        settings.check_bind()
    except ValidationError as exc:  # e.g. a token under 32 characters: one line per setting, no traceback
        for err in exc.errors():
            name = "CONVTUNE_" + "_".join(str(p) for p in err.get("loc", ())).upper()
            msg = err["msg"].removeprefix("Value error, ")
            print(f"error: {msg if msg.startswith(name) else f'{name}: {msg}'}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0


def run_demo(args) -> int:
    from service.cli.client import Api, ApiError, fmt_metric, spec_payload, watch
    from service.cli.live import best_params_text, detail_best

    data_dir = stack_data_dir(args.data_dir)
    try:
        state = up(data_dir, **_up_kwargs(args))
        api = Api(state["api_url"])
        body, media = spec_payload(args.spec)
        created = api.post("/v1/sweeps", content=body, headers={"Content-Type": media})
        print(f"\nsubmitted {args.spec} as {created['id']}; watching (Ctrl-C stops watching, not the sweep)\n")
        code = watch(api, created["id"], args.interval)
        detail = api.get(f"/v1/sweeps/{created['id']}")
    except (RuntimeError, ApiError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    best = detail_best(detail)
    print()
    if best:
        print(f"best trial: {best['trial_id']}  {best['metric']} = {fmt_metric(best['value'])}")
        print(f"  {best_params_text(best)}")
    if detail.get("model_version"):
        print(f"registered model version {detail['model_version']}; download it with: convtune export {created['id']}")
    print(f"browse it in MLflow: {detail['links'].get('mlflow') or state['mlflow']['url']}")
    if args.down:
        down(data_dir)
    else:
        print("the stack keeps running; stop it with: convtune down")
    return code


def register(subparsers) -> None:
    p = subparsers.add_parser("up", help="Start the local stack: Ray head, MLflow server and the API")
    _stack_args(p)
    p.set_defaults(handler=run_up)

    p = subparsers.add_parser("down", help="Stop the local stack started by `convtune up`")
    p.add_argument("--data-dir", default=None, help="state folder (default: $CONVTUNE_DATA_DIR or ~/.convtune)")
    p.set_defaults(handler=run_down)

    p = subparsers.add_parser("demo", help="The main job end to end: up, submit the quickstart sweep, watch it, "
                              "print the best trial and the MLflow URL")
    _stack_args(p)
    p.add_argument("--spec", default="quickstart", help="spec file or preset to run (default: quickstart)")
    p.add_argument("--interval", type=float, default=0.5, help="at most one redraw per this many seconds "
                   "(default 0.5)")
    p.add_argument("--down", action="store_true", help="stop the stack when the sweep ends")
    p.set_defaults(handler=run_demo)

    p = subparsers.add_parser("serve", help="Run the API server in the foreground (settings from CONVTUNE_* env)")
    p.add_argument("--host", default=None, help="bind address (default $CONVTUNE_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default $CONVTUNE_PORT or 8000)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.set_defaults(handler=run_serve)
