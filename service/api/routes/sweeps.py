"""/v1/sweeps: submit, validate, list, detail, trials, events, logs, cancel, resume.

Detail, trials and events are database reads (the reconciler keeps the rows current, see
service/sweeps.py); detail and trials carry a strong ETag and answer If-None-Match with 304."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel

from service.api.deps import Caller, get_service, get_settings, read_access, submit_access
from service.api.schemas import (
    ErrorOut,
    Links,
    SweepCreated,
    SweepDetail,
    SweepPage,
    SweepSummary,
    TrialOut,
    TrialTable,
)
from service.jobs import JobNotFound, RayUnavailable, attempt_job_id
from service.models import SweepStatus, Trial, utcnow
from service.settings import Settings
from service.specs import check_spec, parse_body
from service.sweeps import SweepNotFound, SweepService, as_utc, objective, spec_data

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])

SweepId = Annotated[str, Path(pattern=r"^sw-[0-9a-f]{12}$", description="A sweep id, e.g. sw-0123456789ab")]
ERRORS = {401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 503: {"model": ErrorOut}}
NOT_FOUND = {404: {"model": ErrorOut}}
EVENT_BATCH = 500  # events read per look at the log


def spec_body(schema_ref: str = "#/components/schemas/SweepSpec") -> dict:
    """OpenAPI for a spec body: JSON per the SweepSpec schema, or the same as YAML text."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": schema_ref}},
        "application/yaml": {"schema": {"type": "string", "description": "the spec as YAML"}},
    }}}


def links(request: Request, settings: Settings, sweep, mlflow_url: str | None = None) -> Links:
    base = f"/v1/sweeps/{sweep.id}"
    return Links(self=base, trials=f"{base}/trials", logs=f"{base}/logs", mlflow=mlflow_url,
                 ray=f"{settings.ray_url}/#/jobs/{sweep.ray_job_id}")


def summary(sweep) -> SweepSummary:
    return SweepSummary(id=sweep.id, name=sweep.name, status=sweep.status, attempt=sweep.attempt,
                        created_at=as_utc(sweep.created_at), updated_at=as_utc(sweep.updated_at),
                        finished_at=as_utc(sweep.finished_at), owner=sweep.owner)


def trial_out(trial: Trial) -> TrialOut:
    return TrialOut(trial_id=trial.trial_id, run_id=trial.run_id, status=trial.status,
                    params={k: str(v) for k, v in (trial.params or {}).items()}, metrics=trial.metrics or {},
                    epoch=trial.epoch, best_metric=trial.best_metric, outcome=trial.outcome, lr=trial.resolved_lr,
                    started_at=as_utc(trial.started_at), ended_at=as_utc(trial.ended_at))


def with_etag(request: Request, body: BaseModel) -> Response:
    """The body as JSON with a strong ETag (a hash of its bytes); 304 when If-None-Match already has it."""
    content = body.model_dump_json().encode()
    etag = '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    wanted = {tag.strip().removeprefix("W/") for tag in request.headers.get("if-none-match", "").split(",")}
    if etag in wanted or "*" in wanted:
        return Response(status_code=304, headers=headers)
    return Response(content, media_type="application/json", headers=headers)


def stale_warning(sweep, settings: Settings) -> list[str]:
    """An active sweep the reconciler has not synced for a while: say so (Ray or MLflow is likely down)."""
    if SweepStatus(sweep.status).is_terminal and sweep.finished_at is not None:
        return []
    synced = as_utc(sweep.synced_at)
    limit = max(3 * settings.reconcile_interval_s, 15.0)
    if synced is not None and (as_utc(utcnow()) - synced).total_seconds() > limit:
        return [f"status and trials may be stale: last synced with Ray and MLflow at {synced.isoformat()}"]
    return []


async def read_spec(request: Request, settings: Settings):
    body = await request.body()
    data = parse_body(body, request.headers.get("content-type"))
    return await run_in_threadpool(check_spec, data, settings.data_roots, settings.max_trials)


def _get(service: SweepService, sweep_id: str, caller: Caller, *, action: bool = False):
    """The sweep, if ``caller`` may see it: another owner's sweep is 404 to a read (ids do not leak) and 403
    to an action."""
    try:
        sweep = service.get(sweep_id)
    except SweepNotFound:
        raise HTTPException(404, f"no sweep {sweep_id}") from None
    if not caller.owns(sweep):
        if action:
            raise HTTPException(403, f"sweep {sweep_id} belongs to another owner")
        raise HTTPException(404, f"no sweep {sweep_id}")
    return sweep


@router.post("", status_code=202, response_model=SweepCreated, openapi_extra=spec_body(),
             summary="Submit a sweep", responses={**ERRORS, 409: {"model": ErrorOut}, 413: {"model": ErrorOut},
                                                  422: {"model": ErrorOut}})
async def submit_sweep(
    request: Request,
    caller: Annotated[Caller, Depends(submit_access)],
    idempotency_key: Annotated[str | None, Header(max_length=200, description=(
        "Retrying with the same key returns the same sweep instead of starting a second job"))] = None,
    settings: Settings = Depends(get_settings),
    service: SweepService = Depends(get_service),
):
    """Validate the spec (JSON, or YAML with `Content-Type: application/yaml`) and start it as a Ray job."""
    checked = await read_spec(request, settings)
    result = await run_in_threadpool(service.submit, checked, idempotency_key=idempotency_key, owner=caller.owner)
    body = SweepCreated(id=result.sweep.id, status=result.sweep.status, created=result.created,
                        links=links(request, settings, result.sweep))
    return JSONResponse(body.model_dump(mode="json"), status_code=202,
                        headers={"Location": f"/v1/sweeps/{result.sweep.id}"})


@router.post("/validate", openapi_extra=spec_body(), summary="Dry-run a spec; nothing is submitted",
             responses={**ERRORS, 413: {"model": ErrorOut}, 422: {"model": ErrorOut}})
async def validate_sweep(
    request: Request,
    _: Annotated[Caller, Depends(submit_access)],
    settings: Settings = Depends(get_settings),
    service: SweepService = Depends(get_service),
) -> dict:
    """The dry run: the resolved trials and resources, against the live cluster when Ray answers."""
    from search_spaces.spec import dry_run

    checked = await read_spec(request, settings)
    resources = await run_in_threadpool(service.jobs.cluster_resources)
    totals, nodes = resources or (None, None)
    report = await run_in_threadpool(dry_run, checked.spec, totals, nodes)
    report = dict(report) if isinstance(report, dict) else {"report": report}
    report.setdefault("valid", True)
    if resources is None:
        report.setdefault("warnings", []).append(
            "Ray is unreachable: resources were not checked against a live cluster")
    return report


@router.get("", response_model=SweepPage, summary="List sweeps", responses=ERRORS)
def list_sweeps(
    request: Request,
    caller: Annotated[Caller, Depends(read_access)],
    status: Annotated[list[SweepStatus] | None, Query(description="Only these statuses (repeatable)")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    service: SweepService = Depends(get_service),
):
    rows, total = service.list([s.value for s in status] if status else None, limit, offset,
                               owners=None if caller.admin else caller.aliases)
    nxt = offset + len(rows) if offset + len(rows) < total else None
    return with_etag(request, SweepPage(items=[summary(r) for r in rows], total=total, limit=limit, offset=offset,
                                        next_offset=nxt))


@router.get("/{sweep_id}", response_model=SweepDetail, summary="A sweep: status, progress, best trial, links",
            responses={**ERRORS, **NOT_FOUND})
def get_sweep(
    request: Request,
    sweep_id: SweepId,
    caller: Annotated[Caller, Depends(read_access)],
    settings: Settings = Depends(get_settings),
    service: SweepService = Depends(get_service),
):
    try:
        sweep, best, counts = service.detail_parts(sweep_id)
    except SweepNotFound:
        raise HTTPException(404, f"no sweep {sweep_id}") from None
    if not caller.owns(sweep):
        raise HTTPException(404, f"no sweep {sweep_id}")  # as for an id that does not exist
    data = spec_data(sweep)
    metric, mode = objective(data)
    mlflow_url = service.mlflow.run_url(settings.mlflow_url, sweep.mlflow_experiment_id, sweep.mlflow_parent_run_id)
    warnings = [sweep.trials_note] if sweep.trials_note else []
    body = SweepDetail(**summary(sweep).model_dump(), message=sweep.message, ray_job_id=sweep.ray_job_id,
                       metric=metric, mode=mode, progress=service.progress(sweep.total_trials, counts),
                       best_trial=trial_out(best) if best else None, model_name=sweep.model_name,
                       model_version=sweep.model_version, links=links(request, settings, sweep, mlflow_url), spec=data,
                       warnings=warnings + stale_warning(sweep, settings))
    return with_etag(request, body)


@router.get("/{sweep_id}/trials", response_model=TrialTable, summary="The trial table",
            responses={**ERRORS, **NOT_FOUND})
def get_trials(
    request: Request,
    sweep_id: SweepId,
    caller: Annotated[Caller, Depends(read_access)],
    settings: Settings = Depends(get_settings),
    service: SweepService = Depends(get_service),
):
    """Every trial with its searched params, latest metrics, epoch and status, as the reconciler last stored them."""
    try:
        sweep, trials = service.trials(sweep_id)
    except SweepNotFound:
        raise HTTPException(404, f"no sweep {sweep_id}") from None
    if not caller.owns(sweep):
        raise HTTPException(404, f"no sweep {sweep_id}")
    metric, mode = objective(spec_data(sweep))
    warnings = [sweep.trials_note] if sweep.trials_note else []
    body = TrialTable(sweep_id=sweep.id, metric=metric, mode=mode, trials=[trial_out(t) for t in trials],
                      warnings=warnings + stale_warning(sweep, settings))
    return with_etag(request, body)


def sse(event_id: int | None, kind: str, data: dict) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def finalized(sweep) -> bool:
    return SweepStatus(sweep.status).is_terminal and sweep.finished_at is not None


@router.get("/{sweep_id}/events", summary="Live events of a sweep (server-sent events)",
            responses={**ERRORS, **NOT_FOUND, 400: {"model": ErrorOut}, 200: {"content": {"text/event-stream": {}}}})
async def get_events(
    request: Request,
    sweep_id: SweepId,
    caller: Annotated[Caller, Depends(read_access)],
    last_event_id: Annotated[str | None, Header(description=(
        "Resume after this event id (what the last event received carried)"))] = None,
    settings: Settings = Depends(get_settings),
    service: SweepService = Depends(get_service),
):
    """`text/event-stream`: `sweep` (status, message, best trial, model version; a snapshot without an id opens
    each connection of an active sweep, then one on every status change and when the best trial changes),
    `trial_started`, `trial_result` (epoch and metrics), `trial_ended` (outcome: completed, early_stopped,
    failed, cancelled), and `: heartbeat` comments. Every stored event has an `id:`; `Last-Event-ID` resumes
    after it with nothing repeated or skipped. The stream ends after the sweep's final `sweep` event."""
    sweep = await run_in_threadpool(_get, service, sweep_id, caller)
    after = 0
    if last_event_id is not None:
        if not re.fullmatch(r"[0-9]{1,18}", last_event_id.strip()):
            raise HTTPException(400, f"Last-Event-ID must be an event id from this stream (a whole number), "
                                     f"got {last_event_id[:40]!r}")
        after = int(last_event_id)

    async def stream():
        nonlocal after
        if not finalized(sweep):
            yield sse(None, "sweep", {**await run_in_threadpool(service.status_event, sweep_id), "final": False})
        beat = time.monotonic()
        while True:
            row, events = await run_in_threadpool(service.events_after, sweep_id, after, EVENT_BATCH)
            for event in events:
                data = dict(event.data)
                if event.type == "sweep" and SweepStatus(data["status"]).is_terminal:
                    data["final"] = (finalized(row) and event.id >= row.last_event_id and event is events[-1]
                                     and len(events) < EVENT_BATCH)  # else a resume followed it
                yield sse(event.id, event.type, data)
                after = event.id
                if data.get("final"):
                    return
            if events:
                beat = time.monotonic()
                continue
            if finalized(row):  # nothing more will come (a sweep from before the event log has no events)
                yield sse(None, "sweep", {**await run_in_threadpool(service.status_event, sweep_id), "final": True})
                return
            if time.monotonic() - beat >= settings.events_heartbeat_s:
                yield ": heartbeat\n\n"
                beat = time.monotonic()
            if await request.is_disconnected():
                return
            await asyncio.sleep(settings.events_poll_s)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{sweep_id}/logs", response_class=PlainTextResponse, summary="The driver's log",
            responses={**ERRORS, **NOT_FOUND, 200: {"content": {"text/plain": {}}}})
async def get_logs(
    sweep_id: SweepId,
    caller: Annotated[Caller, Depends(read_access)],
    tail: Annotated[int | None, Query(ge=1, le=100_000, description="Only the last N lines")] = None,
    follow: Annotated[bool, Query(description="Stream the log until the sweep's job ends")] = False,
    attempt: Annotated[int | None, Query(ge=1, le=1000, description="Which attempt (default: latest)")] = None,
    service: SweepService = Depends(get_service),
):
    sweep = await run_in_threadpool(_get, service, sweep_id, caller)
    attempt = attempt or sweep.attempt
    if attempt > sweep.attempt:
        raise HTTPException(404, f"sweep {sweep_id} has {sweep.attempt} attempt(s)")
    job_id = attempt_job_id(sweep.id, attempt)
    try:
        full = await run_in_threadpool(service.jobs.logs, job_id)
    except JobNotFound:
        raise HTTPException(404, f"Ray has no job {job_id} (yet)") from None
    text = "".join(full.splitlines(keepends=True)[-tail:]) if tail else full
    if not follow:
        return PlainTextResponse(text)

    async def stream():
        yield text
        skip = len(full)  # Ray's log tail replays the log from its start: drop what was sent
        try:
            async for chunk in service.jobs.follow(job_id):
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                yield chunk[skip:]
                skip = 0
        except (RayUnavailable, RuntimeError):
            yield "\n[convtune] lost the log stream from Ray\n"

    return StreamingResponse(stream(), media_type="text/plain")


@router.post("/{sweep_id}/cancel", response_model=SweepSummary, status_code=202,
             summary="Stop a sweep gracefully (the driver saves its state)",
             responses={**ERRORS, **NOT_FOUND, 409: {"model": ErrorOut}})
def cancel_sweep(
    sweep_id: SweepId,
    caller: Annotated[Caller, Depends(submit_access)],
    service: SweepService = Depends(get_service),
):
    _get(service, sweep_id, caller, action=True)
    return summary(service.cancel(sweep_id))


@router.post("/{sweep_id}/resume", response_model=SweepSummary, status_code=202,
             summary="Continue a stopped or failed sweep from its saved state",
             responses={**ERRORS, **NOT_FOUND, 409: {"model": ErrorOut}})
def resume_sweep(
    sweep_id: SweepId,
    caller: Annotated[Caller, Depends(submit_access)],
    service: SweepService = Depends(get_service),
):
    _get(service, sweep_id, caller, action=True)
    return summary(service.resume(sweep_id))
