"""The live watch view: the renderer as a pure function of events, and the SSE reader over real HTTP.

The reader is tested against a tiny scripted ASGI app served by uvicorn on a free port (this tests the
client's parsing and reconnects, not the server's event route).
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time

import pytest
import uvicorn
from rich.console import Console

from service.cli import main
from service.cli.client import Api
from service.cli.common import ApiError
from service.cli.live import Event, EventStream, WatchState, event_line, fold, follow, parse_sse, render

SWEEP = "sw-0123456789ab"
PARAMS_1 = {"blr": 0.001, "layer_decay": 0.8, "mlflow": {"run_id": "x"}}
PARAMS_2 = {"blr": 0.004, "layer_decay": 0.9}
BEST = {"trial_id": "t2", "metric": "val_top1", "value": 91.25, "params": {"blr": 0.004, "layer_decay": 0.9},
        "lr": 0.0005}
SCRIPT = [
    Event("sweep", {"sweep_id": SWEEP, "status": "RUNNING", "best": None}, "1"),
    Event("trial_started", {"trial_id": "t1", "params": PARAMS_1}, "2"),
    Event("trial_result", {"trial_id": "t1", "epoch": 1, "metrics": {"val_top1": 40.5, "train_loss": 2.1}}, "3"),
    Event("trial_ended", {"trial_id": "t1", "outcome": "early_stopped", "epoch": 1, "best_metric": 40.5}, "4"),
    Event("trial_started", {"trial_id": "t2", "params": PARAMS_2}, "5"),
    Event("trial_result", {"trial_id": "t2", "epoch": 2, "metrics": {"val_top1": 91.25}}, "6"),
    Event("trial_ended", {"trial_id": "t2", "outcome": "completed", "epoch": 2, "best_metric": 91.25}, "7"),
    Event("sweep", {"sweep_id": SWEEP, "status": "SUCCEEDED", "best": BEST}, "8"),
]


def text_of(renderable, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


# ------------------------------------------------------------------------------------ renderer

def test_table_shows_trial_status_epoch_metric_and_searched_params_only():
    state = fold(SWEEP, "val_top1", SCRIPT)
    assert state.finished and state.status == "SUCCEEDED"
    assert [(r.trial_id, r.status, r.epoch, r.value) for r in state.trials.values()] == [
        ("t1", "early_stopped", 1, 40.5), ("t2", "completed", 2, 91.25)]
    lines = text_of(render(state)).splitlines()
    header = next(line for line in lines if "trial" in line and "status" in line)
    assert header.split() == ["┃", "trial", "┃", "status", "┃", "epoch", "┃", "val_top1", "┃", "blr", "┃",
                              "layer_decay", "┃"]
    row = next(line for line in lines if " t2 " in line)
    assert [c.strip() for c in row.strip("│ ").split("│")] == ["t2", "completed", "2", "91.25", "0.004", "0.9"]
    text = "\n".join(lines)
    assert "mlflow" not in text and "train_loss" not in text
    assert lines[0].strip() == f"{SWEEP}  SUCCEEDED"
    assert text.rstrip().splitlines()[-1] == "best: t2  val_top1=91.25  lr=0.0005  blr=0.004  layer_decay=0.9"


def test_rendering_is_a_function_of_the_events_so_far():
    partial = fold(SWEEP, "val_top1", SCRIPT[:3])
    text = text_of(render(partial))
    assert f"{SWEEP}  RUNNING" in text and "best: -" in text
    row = next(line for line in text.splitlines() if " t1 " in line)
    assert [c.strip() for c in row.strip("│ ").split("│")] == ["t1", "RUNNING", "1", "40.5", "0.001", "0.8"]
    assert text_of(render(fold(SWEEP, "val_top1", SCRIPT[:3]))) == text


def test_one_line_per_event_when_not_a_terminal():
    out = io.StringIO()
    state = follow(iter(SCRIPT), WatchState(SWEEP, "val_top1"), tty=False, out=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(SCRIPT) and state.status == "SUCCEEDED"
    assert lines[1] == "trial t1 started  blr=0.001  layer_decay=0.8"
    assert lines[2] == "trial t1 epoch 1  val_top1=40.5"
    assert lines[3] == "trial t1 early_stopped after epoch 1  best val_top1=40.5"
    assert lines[-1] == f"sweep {SWEEP} SUCCEEDED  " + "best: t2  val_top1=91.25  lr=0.0005  blr=0.004  layer_decay=0.9"
    assert event_line(SCRIPT[0], "val_top1") == f"sweep {SWEEP} RUNNING  best: -"


def test_on_a_terminal_the_table_is_redrawn_in_place():
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    follow(iter(SCRIPT), WatchState(SWEEP, "val_top1"), tty=True, min_redraw_s=0, console=console)
    raw = out.getvalue()
    assert "\x1b[2K" in raw and "\x1b[1A" in raw  # erase line / cursor up: the same lines are rewritten
    assert raw.count("┏") > len(SCRIPT)  # redrawn after every event (min_redraw_s=0), at the same place
    assert "best: t2  val_top1=91.25" in raw


def test_parse_sse_lines():
    lines = [": heartbeat", "id: 7", "event: trial_result", 'data: {"trial_id": "t1",', 'data: "epoch": 3}', "",
             ": heartbeat", "", "event: sweep", "data: {\"status\": \"FAILED\"}", ""]
    events = list(parse_sse(lines))
    assert events == [Event("trial_result", {"trial_id": "t1", "epoch": 3}, "7"),
                      Event("sweep", {"status": "FAILED"}, "7")]


# ------------------------------------------------------------------------- reader over real HTTP

def sse(event: Event) -> bytes:
    return f"id: {event.id}\nevent: {event.event}\ndata: {json.dumps(event.data)}\n\n".encode()


class ScriptedServer:
    """An ASGI app: connection k streams `plan[k]` (a list of events, 'beat', or 'drop' to cut the socket)."""

    def __init__(self, plan: list[list], polled: dict | None = None):
        self.plan, self.requests, self.polled = plan, [], polled  # polled: an API without the event route
        self.port = self._free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="critical", lifespan="off",
                                interface="asgi3")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @staticmethod
    def _free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def app(self, scope, receive, send):
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        polled = self.polled or {}
        if scope["path"] in (f"/v1/sweeps/{SWEEP}", f"/v1/sweeps/{SWEEP}/trials") and (
                scope["path"].endswith(SWEEP) or polled):
            body = json.dumps(polled.get(scope["path"].rsplit("/", 1)[-1]) or
                              {"id": SWEEP, "metric": "val_top1", "status": "RUNNING"}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["path"] != f"/v1/sweeps/{SWEEP}/events" or polled:
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"detail": "no sweep sw-nope"}'})
            return
        self.requests.append(headers)
        items = self.plan[len(self.requests) - 1] if len(self.requests) <= len(self.plan) else [500]
        if items == [500]:
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"busy"})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for item in items:
            if item == "drop":
                raise RuntimeError("connection cut mid-stream")  # uvicorn closes the socket mid-body
            chunk = b": heartbeat\n\n" if item == "beat" else sse(item)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the scripted server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_reader_reconnects_with_last_event_id_after_an_end_and_a_cut():
    plan = [SCRIPT[:2] + ["beat"],  # ends without the terminal event
            ["beat", *SCRIPT[2:4], "drop"],  # the socket is cut mid-stream
            SCRIPT[4:]]
    with ScriptedServer(plan) as server:
        api = Api(server.url, token="tok-read")
        stream = EventStream(api, SWEEP, retry_s=0.05)
        events = list(stream)
    assert events == SCRIPT  # every event once, in order, the terminal `sweep` last
    assert [r.get("last-event-id") for r in server.requests] == [None, "2", "4"]
    assert stream.reconnects[0] == "the stream ended before the sweep did"
    assert stream.reconnects[1].startswith("RemoteProtocolError")
    assert all(r["authorization"] == "Bearer tok-read" and r["accept"] == "text/event-stream"
               for r in server.requests)


def test_reader_gives_up_after_repeated_failures_and_does_not_retry_4xx():
    with ScriptedServer([]) as server:  # every connection answers 503
        with pytest.raises(ApiError, match="lost the event stream .*HTTP 503.* after 3 attempts"):
            list(EventStream(Api(server.url), SWEEP, retry_s=0.01, max_failures=3))
        assert len(server.requests) == 3
        with pytest.raises(ApiError, match="HTTP 404: no sweep sw-nope"):
            list(EventStream(Api(server.url), "sw-nope", retry_s=0.01))


def test_watch_command_prints_one_line_per_event_and_exits_0_on_success(capsys):
    with ScriptedServer([SCRIPT[:5] + ["drop"], SCRIPT[5:]]) as server:
        code = main(["watch", SWEEP, "--api", server.url])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out == [event_line(e, "val_top1") for e in SCRIPT]


def test_watch_falls_back_to_polling_an_api_without_the_event_route(capsys):
    logged = {"blr": "0.004", "layer_decay": "0.9", "resolved_lr": "0.0005", "epochs": "2", "optimizer": "adamw"}
    detail = {"id": SWEEP, "metric": "val_top1", "status": "SUCCEEDED", "spec": {"space": {"blr": {}, "layer_decay": {}}},
              "best_trial": {"trial_id": "t2", "metrics": {"val_top1": 91.25}, "params": logged}}
    trials = {"trials": [{"trial_id": "t2", "status": "FINISHED", "params": logged,
                          "metrics": {"epoch": 2.0, "val_top1": 91.25}},
                         {"trial_id": "t3", "status": "PENDING", "params": logged, "metrics": {}}]}
    with ScriptedServer([], polled={SWEEP: detail, "trials": trials}) as server:
        code = main(["watch", SWEEP, "--api", server.url])
    assert code == 0 and server.requests == []  # the event route answered 404 (not recorded)
    captured = capsys.readouterr()
    assert f"note: {server.url} has no event stream; polling every 3 s" in captured.err
    assert captured.out.splitlines() == [
        "trial t2 started  blr=0.004  layer_decay=0.9",
        "trial t2 epoch 2  val_top1=91.25",
        "trial t2 completed after epoch 2  best val_top1=91.25",
        f"sweep {SWEEP} SUCCEEDED  best: t2  val_top1=91.25  lr=0.0005  blr=0.004  layer_decay=0.9"]
