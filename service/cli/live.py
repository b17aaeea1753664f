"""The live view of `convtune watch`, `submit --watch` and `demo`, fed by the sweep's event stream.

`GET /v1/sweeps/{id}/events` is a server-sent event stream: `sweep` (status and best trial; first on
every connection to an unfinished sweep, again on each status change and new best, last with a
terminal status and `final` true), `trial_started`, `trial_result`, `trial_ended`, and `: heartbeat`
comments. Three parts, each testable alone:

* :func:`parse_sse` turns the stream's lines into :class:`Event` objects;
* :class:`EventStream` reads them over httpx and reconnects with `Last-Event-ID` when the connection
  drops, until the sweep's terminal `sweep` event;
* :class:`WatchState` folds events into the table's rows and :func:`render` draws it (pure: the same
  events give the same table); on a terminal the table is redrawn in place (rich `Live`), otherwise
  :func:`event_line` prints one line per event.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
HIDDEN_PARAMS = {"mlflow", "grid_point"}


@dataclass(frozen=True)
class Event:
    event: str
    data: dict[str, Any]
    id: str | None = None


def parse_sse(lines: Iterable[str]) -> Iterator[Event]:
    """Server-sent events from a stream's lines (blank line = dispatch, `:` = comment, JSON data)."""
    kind, data, event_id = "message", [], None
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield Event(kind, json.loads("\n".join(data)), event_id)
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


class EventStream:
    """The sweep's events over HTTP, reconnecting (with `Last-Event-ID`) until its terminal `sweep` event.

    A dropped connection, a read timeout (no heartbeat for ``read_timeout`` s) or a 5xx is retried
    after ``retry_s``, doubling up to ``max_retry_s`` while attempts bring no event (an API restart
    takes a while); ``max_failures`` such attempts in a row give up with ApiError. An API without the
    event route (404 for a sweep that exists) is followed by polling instead (:class:`PolledEvents`).
    """

    def __init__(self, api, sweep_id: str, *, retry_s: float = 1.0, max_retry_s: float = 10.0,
                 max_failures: int = 10, read_timeout: float = 60.0, poll_s: float = 3.0):
        self.api, self.sweep_id, self.poll_s = api, sweep_id, poll_s
        self.retry_s, self.max_retry_s, self.max_failures = retry_s, max_retry_s, max_failures
        self.read_timeout = read_timeout
        self.last_id: str | None = None
        self.reconnects: list[str] = []  # why each connection ended early

    def __iter__(self) -> Iterator[Event]:
        import httpx

        from service.cli.common import ApiError, error_message

        failures, last_error = 0, ""
        while failures < self.max_failures:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if self.last_id is not None:
                headers["Last-Event-ID"] = self.last_id
            got_event = no_route = False
            try:
                with self.api.http.stream("GET", f"/v1/sweeps/{self.sweep_id}/events", headers=headers,
                                          timeout=httpx.Timeout(10.0, read=self.read_timeout)) as resp:
                    no_route = resp.status_code == 404 and self.last_id is None and got_sweep(self.api, self.sweep_id)
                    if 400 <= resp.status_code < 500 and not no_route:
                        resp.read()
                        raise ApiError(error_message(resp))
                    if no_route or resp.status_code >= 500:
                        last_error = f"HTTP {resp.status_code}"
                    else:
                        for event in parse_sse(resp.iter_lines()):
                            got_event = True
                            if event.id is not None:
                                self.last_id = event.id
                            yield event
                            if is_last(event):
                                return
                        last_error = "the stream ended before the sweep did"
            except httpx.TransportError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if no_route:  # an API that predates the event route
                print(f"note: {self.api.url} has no event stream; polling every {self.poll_s:g} s", file=sys.stderr)
                yield from PolledEvents(self.api, self.sweep_id, self.poll_s)
                return
            failures = 0 if got_event else failures + 1
            self.reconnects.append(last_error)
            time.sleep(min(self.retry_s * 2 ** max(failures - 1, 0), self.max_retry_s))
        raise ApiError(f"lost the event stream of {self.sweep_id} ({last_error}) after {self.max_failures} "
                       f"attempts; `convtune status {self.sweep_id}` shows where it is")


def is_last(event: Event) -> bool:
    """The sweep's final event: a terminal ``sweep`` event the server does not mark ``final: false`` (it does so
    for the opening snapshot of a sweep whose final sync is still to come, and for the end of an attempt that
    was resumed)."""
    return event.event == "sweep" and event.data.get("status") in TERMINAL and event.data.get("final", True)


def got_sweep(api, sweep_id: str) -> bool:
    from service.cli.common import ApiError

    try:
        api.get(f"/v1/sweeps/{sweep_id}")
    except ApiError:
        return False
    return True


#: trial status in `GET /v1/sweeps/{id}/trials` -> the `outcome` of a `trial_ended` event
POLLED_OUTCOMES = {"FINISHED": "completed", "STOPPED_EARLY": "early_stopped", "FAILED": "failed",
                   "KILLED": "cancelled"}


class PolledEvents:
    """The same events, derived by polling the sweep and its trials every ``interval`` s: for an API
    that predates the event route. Params are limited to the spec's searched ones."""

    def __init__(self, api, sweep_id: str, interval: float = 3.0):
        self.api, self.sweep_id, self.interval = api, sweep_id, interval

    def __iter__(self) -> Iterator[Event]:
        from service.cli.common import ApiError

        seen: dict[str, tuple[Any, str]] = {}
        last_status = None
        while True:
            detail = self.api.get(f"/v1/sweeps/{self.sweep_id}")
            space = set((detail.get("spec") or {}).get("space") or ())
            try:
                trials = self.api.get(f"/v1/sweeps/{self.sweep_id}/trials")["trials"]
            except ApiError:
                trials = []
            for t in trials:
                tid, status, epoch = t["trial_id"], t["status"], (t.get("metrics") or {}).get("epoch")
                epoch = int(epoch) if isinstance(epoch, float) and epoch.is_integer() else epoch  # MLflow: floats
                before = seen.get(tid)
                if status == "PENDING":
                    continue
                if before is None:
                    params = {k: param_value(v) for k, v in t["params"].items() if not space or k in space}
                    yield Event("trial_started", {"trial_id": tid, "params": params})
                if epoch is not None and (before is None or before[0] != epoch):
                    yield Event("trial_result", {"trial_id": tid, "epoch": epoch, "metrics": t["metrics"]})
                if status in POLLED_OUTCOMES and (before is None or before[1] != status):
                    yield Event("trial_ended", {"trial_id": tid, "outcome": POLLED_OUTCOMES[status], "epoch": epoch,
                                                "best_metric": t["metrics"].get(detail["metric"])})
                seen[tid] = (epoch, status)
            if detail["status"] != last_status or detail["status"] in TERMINAL:
                last_status = detail["status"]
                yield Event("sweep", {"sweep_id": self.sweep_id, "status": detail["status"],
                                      "best": detail_best(detail)})
            if detail["status"] in TERMINAL:
                return
            time.sleep(self.interval)


# ------------------------------------------------------------------------------------------ state

@dataclass
class TrialRow:
    trial_id: str
    status: str = "PENDING"
    epoch: int | None = None
    value: float | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class WatchState:
    """What the table shows, folded from the events: pure, no I/O."""

    sweep_id: str
    metric: str
    status: str = "connecting"
    best: dict[str, Any] | None = None
    trials: dict[str, TrialRow] = field(default_factory=dict)

    def row(self, trial_id: str) -> TrialRow:
        return self.trials.setdefault(trial_id, TrialRow(trial_id))

    def apply(self, event: Event) -> WatchState:
        d = event.data
        if event.event == "sweep":
            self.status, self.best = d.get("status", self.status), d.get("best")
        elif event.event == "trial_started":
            row = self.row(d["trial_id"])
            row.status, row.params = "RUNNING", searched(d.get("params"))
        elif event.event == "trial_result":
            row = self.row(d["trial_id"])
            row.status, row.epoch = "RUNNING", d.get("epoch", row.epoch)
            row.value = (d.get("metrics") or {}).get(self.metric, row.value)
        elif event.event == "trial_ended":
            row = self.row(d["trial_id"])
            row.status = d.get("outcome", "ended")
            row.epoch = d.get("epoch", row.epoch)
            if d.get("best_metric") is not None:
                row.value = d["best_metric"]
        return self

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def param_names(self) -> list[str]:
        return list(dict.fromkeys(k for row in self.trials.values() for k in row.params))


def fold(sweep_id: str, metric: str, events: Iterable[Event]) -> WatchState:
    state = WatchState(sweep_id, metric)
    for event in events:
        state.apply(event)
    return state


def searched(params: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (params or {}).items() if k not in HIDDEN_PARAMS}


def detail_best(detail: dict[str, Any]) -> dict[str, Any] | None:
    """The detail's best trial as the event stream's `best`: searched params and the resolved LR only."""
    best = detail.get("best_trial")
    if not best:
        return None
    space = (detail.get("spec") or {}).get("space")
    params = best.get("params") or {}
    params = {k: param_value(params[k]) for k in (space or params) if k in params}
    return {"trial_id": best["trial_id"], "metric": detail["metric"], "value": best["metrics"].get(detail["metric"]),
            "params": params, "lr": best.get("lr") if best.get("lr") is not None else
            param_value(best["params"].get("resolved_lr"))}  # an API before 0.2 lists every param, resolved_lr too


def param_value(value: Any) -> Any:
    """MLflow keeps params as strings: numbers back to numbers, so they print short."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def best_params_text(best: dict[str, Any]) -> str:
    """`lr=LR  param=value ...`: the resolved LR and the searched params, nothing else."""
    parts = [f"lr={fmt(best['lr'])}"] if best.get("lr") is not None else []
    return "  ".join(parts + [f"{k}={fmt(v)}" for k, v in searched(best.get("params")).items()])


def best_text(best: dict[str, Any] | None) -> str:
    """`best: TRIAL METRIC=VALUE  lr=LR  param=value ...`."""
    if not best:
        return "best: -"
    return f"best: {best['trial_id']}  {best.get('metric', 'metric')}={fmt(best.get('value'))}  {best_params_text(best)}"


def render(state: WatchState):
    """The live table (a rich renderable): trial, status, epoch, metric and the searched params."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    names = state.param_names()
    table = Table(title=f"{state.sweep_id}  {state.status}", title_justify="left", expand=False)
    for col in ("trial", "status", "epoch", state.metric, *names):
        table.add_column(col, overflow="fold", justify="right" if col in ("epoch", state.metric) else "left")
    for row in state.trials.values():
        table.add_row(row.trial_id, row.status, fmt(row.epoch), fmt(row.value),
                      *(fmt(row.params.get(n)) for n in names))
    return Group(table, Text(best_text(state.best)))


def event_line(event: Event, metric: str) -> str:
    """One line per event, for logs and pipes."""
    d = event.data
    if event.event == "sweep":
        return f"sweep {d.get('sweep_id', '')} {d.get('status')}  {best_text(d.get('best'))}"
    if event.event == "trial_started":
        params = "  ".join(f"{k}={fmt(v)}" for k, v in searched(d.get("params")).items())
        return f"trial {d['trial_id']} started  {params}"
    if event.event == "trial_result":
        return f"trial {d['trial_id']} epoch {d.get('epoch')}  {metric}={fmt((d.get('metrics') or {}).get(metric))}"
    if event.event == "trial_ended":
        return (f"trial {d['trial_id']} {d.get('outcome')} after epoch {d.get('epoch')}  "
                f"best {metric}={fmt(d.get('best_metric'))}")
    return f"{event.event} {json.dumps(d)}"


def follow(events: Iterable[Event], state: WatchState, *, tty: bool, min_redraw_s: float = 0.5, out=None,
           console=None) -> WatchState:
    """Show the events: one table redrawn in place on a terminal, else one line per event.

    On a terminal the table is redrawn at most every ``min_redraw_s`` seconds, and on every status
    change or trial end."""
    out = out or sys.stdout
    if not tty:
        for event in events:
            state.apply(event)
            print(event_line(event, state.metric), file=out, flush=True)
        return state
    from rich.console import Console
    from rich.live import Live

    console = console or Console(file=out)
    last = 0.0
    with Live(render(state), console=console, auto_refresh=False, transient=False) as live:
        for event in events:
            state.apply(event)
            now = time.monotonic()
            if now - last >= min_redraw_s or event.event in ("sweep", "trial_ended"):
                live.update(render(state), refresh=True)
                last = now
        live.update(render(state), refresh=True)
    return state
