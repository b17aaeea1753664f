"""`convtune submit|status|watch|cancel|resume|logs|open`: the REST client of a running service.

The API is found at --api, else $CONVTUNE_API_URL, else the stack `convtune up` started (its
state file in the data folder), else http://127.0.0.1:8000. A token comes from --token (its value is
visible to other users in `ps`: prefer the environment), else $CONVTUNE_API_TOKEN, else a prompt (not
echoed) when the API answers 401 on a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
from pathlib import Path

from service.cli.common import ApiError, error_message, read_state, stack_data_dir

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def default_api_url() -> str:
    if os.environ.get("CONVTUNE_API_URL"):
        return os.environ["CONVTUNE_API_URL"]
    state = read_state(stack_data_dir(None))
    return state.get("api_url", "http://127.0.0.1:8000") if state else "http://127.0.0.1:8000"


class Api:
    """A small httpx wrapper that turns error bodies into one readable line."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0):
        import httpx

        self.url = (url or default_api_url()).rstrip("/")
        token = token or os.environ.get("CONVTUNE_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs):
        if method != "GET" and "content" not in kwargs and "json" not in kwargs:
            # the API refuses state-changing requests without a JSON/YAML content type (CSRF guard)
            kwargs["headers"] = {"Content-Type": "application/json", **kwargs.get("headers", {})}
        with self.transport_errors():
            resp = self.http.request(method, path, **kwargs)
            if resp.status_code == 401 and self.ask_token():
                resp = self.http.request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise ApiError(error_message(resp))
        return resp

    @contextlib.contextmanager
    def transport_errors(self):
        """Turn a connection failure (server down, or gone mid-stream) into one ApiError line."""
        import httpx

        try:
            yield
        except httpx.TransportError as exc:
            raise ApiError(f"cannot reach the convtune API at {self.url} ({type(exc).__name__}: {exc}); is it "
                           "running? (`convtune up` starts the local stack)") from None

    def ask_token(self) -> bool:
        """Prompt for a token (not echoed) when the API wants one and none was given; False off a terminal."""
        if "Authorization" in self.http.headers or not sys.stdin.isatty():
            return False
        token = getpass.getpass(f"API token for {self.url}: ").strip()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"
        return bool(token)

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs):
        return self.request("POST", path, **kwargs).json()


def spec_payload(source: str) -> tuple[bytes, str]:
    """A spec file's bytes with its media type; a bare preset name loads the preset's file."""
    path = Path(source)
    if not path.exists():
        from search_spaces.spec import PRESET_DIR, list_presets

        if source in list_presets():
            path = PRESET_DIR / f"{source}.yaml"
        else:
            raise ApiError(f"no spec file {source!r} and no preset of that name (presets: {', '.join(list_presets())})")
    media = "application/json" if path.suffix.lower() == ".json" else "application/yaml"
    return path.read_bytes(), media


# ------------------------------------------------------------------ rendering

def fmt_metric(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=False)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render_progress(detail: dict) -> str:
    p = detail.get("progress")
    if not p:
        return "progress: unknown (MLflow unreachable)"
    return (f"trials: {p['finished']} finished, {p['running']} running, {p['pending']} pending, "
            f"{p['stopped_early']} stopped early, {p['failed']} failed, {p['killed']} killed (of {p['total']})")


def render_detail(detail: dict) -> str:
    lines = [f"{detail['id']}  {detail['name']}  {detail['status']}  (attempt {detail['attempt']})"]
    if detail.get("message"):
        lines.append(f"  {detail['message']}")
    lines.append("  " + render_progress(detail))
    from service.cli.live import best_text, detail_best

    best = detail_best(detail)
    if best:
        lines.append(f"  {best_text(best)}")
    if detail.get("model_version"):
        lines.append(f"  registered model version: {detail['model_version']} (`convtune export {detail['id']}`)")
    links = detail["links"]
    lines.append(f"  MLflow: {links.get('mlflow') or '(not created yet)'}")
    lines.append(f"  Ray:    {links['ray']}")
    lines.extend(f"  warning: {w}" for w in detail.get("warnings", []))
    return "\n".join(lines)


# ------------------------------------------------------------------ commands

def run_submit(args) -> int:
    api = Api(args.api, args.token)
    body, media = spec_payload(args.spec)
    headers = {"Content-Type": media}
    if args.idempotency_key:
        headers["Idempotency-Key"] = args.idempotency_key
    if args.dry_run:
        report = api.post("/v1/sweeps/validate", content=body, headers=headers)
        try:
            from search_spaces.spec import format_dry_run

            print(format_dry_run(report))
        except (ImportError, KeyError):
            print(json.dumps(report, indent=2))
        return 0
    created = api.post("/v1/sweeps", content=body, headers=headers)
    verb = "submitted" if created["created"] else "already submitted (same Idempotency-Key)"
    print(f"{verb}: {created['id']} ({created['status']})")
    print(f"  follow it with: convtune watch {created['id']}")
    if args.watch:
        return watch(api, created["id"], args.interval)
    return 0


def run_status(args) -> int:
    api = Api(args.api, args.token)
    if args.id:
        detail = api.get(f"/v1/sweeps/{args.id}")
        print(json.dumps(detail, indent=2) if args.json else render_detail(detail))
        return 0
    params = {"limit": args.limit, "offset": args.offset}
    if args.status:
        params["status"] = args.status
    page = api.get("/v1/sweeps", params=params)
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    rows = [[s["id"], s["name"], s["status"], str(s["attempt"]), s["created_at"][:19].replace("T", " ")]
            for s in page["items"]]
    print(render_table(rows, ["id", "name", "status", "attempt", "created (UTC)"]) if rows else "no sweeps")
    if page.get("next_offset") is not None:
        print(f"... {page['total']} in all; next page: --offset {page['next_offset']}")
    return 0


def watch(api: Api, sweep_id: str, interval: float = 0.5) -> int:
    """Follow the sweep's event stream until it ends: a table redrawn in place on a terminal, else one
    line per event. Exit 0 only if it SUCCEEDED."""
    from service.cli.live import EventStream, WatchState, follow

    detail = api.get(f"/v1/sweeps/{sweep_id}")  # a 404 before any stream; names the metric column
    state = follow(EventStream(api, sweep_id), WatchState(sweep_id, detail["metric"]),
                   tty=sys.stdout.isatty(), min_redraw_s=interval)
    return 0 if state.status == "SUCCEEDED" else 1


def run_watch(args) -> int:
    return watch(Api(args.api, args.token), args.id, args.interval)


def run_cancel(args) -> int:
    out = Api(args.api, args.token).post(f"/v1/sweeps/{args.id}/cancel")
    print(f"{out['id']}: {out['status']} (the driver saves its state; `convtune resume {out['id']}` continues it)")
    return 0


def run_resume(args) -> int:
    out = Api(args.api, args.token).post(f"/v1/sweeps/{args.id}/resume")
    print(f"{out['id']}: {out['status']} (attempt {out['attempt']})")
    return 0


def run_logs(args) -> int:
    api = Api(args.api, args.token, timeout=None if args.follow else 30.0)
    params = {"follow": str(bool(args.follow)).lower()}
    if args.tail:
        params["tail"] = args.tail
    if not args.follow:
        sys.stdout.write(api.request("GET", f"/v1/sweeps/{args.id}/logs", params=params).text)
        return 0
    for asked in (False, True):  # a 401 asks for a token (on a terminal) once, then streams again
        with api.transport_errors(), api.http.stream("GET", f"/v1/sweeps/{args.id}/logs", params=params) as resp:
            if resp.status_code == 401 and not asked and api.ask_token():
                continue
            if resp.status_code >= 400:
                resp.read()
                raise ApiError(error_message(resp))
            for chunk in resp.iter_text():
                sys.stdout.write(chunk)
                sys.stdout.flush()
            return 0
    return 0


def run_open(args) -> int:
    detail = Api(args.api, args.token).get(f"/v1/sweeps/{args.id}")
    url = detail["links"].get("mlflow")
    if not url:
        print(f"{args.id} has no MLflow run yet (status {detail['status']}); try again once it runs", file=sys.stderr)
        return 1
    print(url)
    if args.browser:
        import webbrowser

        webbrowser.open(url)
    return 0


def _handled(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except ApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", default=None, help="API URL (default: $CONVTUNE_API_URL, the local stack, :8000)")
    p.add_argument("--token", default=None, help="API token. Prefer $CONVTUNE_API_TOKEN: a --token value is visible "
                   "to other users in `ps`; with neither, a terminal prompts when the API asks for one")


def register(subparsers) -> None:
    p = subparsers.add_parser("submit", help="Submit a sweep spec (YAML/JSON file or preset name) to the service")
    p.add_argument("spec", help="spec file, or a preset name such as quickstart")
    p.add_argument("--idempotency-key", help="retrying with the same key never starts a second sweep")
    p.add_argument("--dry-run", action="store_true", help="validate and show what would run; submit nothing")
    p.add_argument("--watch", action="store_true", help="then watch it until it ends")
    p.add_argument("--interval", type=float, default=0.5, help="with --watch: at most one redraw per this many "
                   "seconds (default 0.5)")
    _common(p)
    p.set_defaults(handler=_handled(run_submit))

    p = subparsers.add_parser("status", help="List sweeps, or show one sweep's status, progress and best trial")
    p.add_argument("id", nargs="?", help="a sweep id (omit to list sweeps)")
    p.add_argument("--status", action="append", help="only sweeps in this status (repeatable)")
    p.add_argument("--limit", type=int, default=20, help="sweeps per page (default 20)")
    p.add_argument("--offset", type=int, default=0, help="skip this many sweeps")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    _common(p)
    p.set_defaults(handler=_handled(run_status))

    p = subparsers.add_parser("watch", help="Show a live trial table until the sweep ends (one line per event "
                              "when not on a terminal)")
    p.add_argument("id")
    p.add_argument("--interval", type=float, default=0.5, help="at most one redraw per this many seconds "
                   "(default 0.5)")
    _common(p)
    p.set_defaults(handler=_handled(run_watch))

    p = subparsers.add_parser("cancel", help="Stop a sweep gracefully (its state is saved for resume)")
    p.add_argument("id")
    _common(p)
    p.set_defaults(handler=_handled(run_cancel))

    p = subparsers.add_parser("resume", help="Continue a stopped or failed sweep from its saved state")
    p.add_argument("id")
    _common(p)
    p.set_defaults(handler=_handled(run_resume))

    p = subparsers.add_parser("logs", help="Print the sweep driver's log")
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the sweep ends")
    p.add_argument("--tail", type=int, default=None, help="only the last N lines")
    _common(p)
    p.set_defaults(handler=_handled(run_logs))

    p = subparsers.add_parser("open", help="Print the sweep's MLflow URL")
    p.add_argument("id")
    p.add_argument("--browser", action="store_true", help="also open it in a web browser")
    _common(p)
    p.set_defaults(handler=_handled(run_open))
