"""The FastAPI application: ``create_app(settings)`` wires settings, storage, job control and routes.

Run it with ``convtune serve`` (or ``uvicorn --factory service.app:create_app``; without
``CONVTUNE_API_TOKENS`` it then still serves loopback clients only, whatever ``--host`` says).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware

from service.api.routes import health, search_spaces, sweeps
from service.db import Database
from service.jobs import JobControl, RayUnavailable
from service.mlflow_reader import MlflowReader, MlflowUnavailable
from service.settings import Settings, get_settings, is_loopback
from service.specs import YAML_TYPES, SpecError
from service.sweeps import Conflict, JobRejected, SweepNotFound, SweepService

log = logging.getLogger("convtune.service")


class BodySizeLimit:
    """Reject bodies over ``max_bytes`` with 413 before any handler reads them (pure ASGI)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await _send_error(send, 400, "Content-Length must be a decimal number of bytes")
        if declared is not None and int(declared) > self.max_bytes:
            return await self._reject(send)
        chunks, size = [], 0
        while True:  # read the (small) body up front so a chunked upload is bounded too
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._reject(send)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _reject(self, send):
        await _send_error(send, 413, f"request body larger than {self.max_bytes} bytes")


async def _send_error(send, status: int, detail: str) -> None:
    await JSONResponse({"detail": detail, "errors": []}, status_code=status)({"type": "http"}, None, send)


STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
BODY_TYPES = ("application/json", "text/json", *YAML_TYPES)


class RequestGuard:
    """What keeps the API from being open by accident (pure ASGI, before any handler):

    * auth off: only loopback clients are served, whatever address the server was bound to
      (``uvicorn --host 0.0.0.0`` included);
    * state-changing requests need a JSON or YAML content type (a browser cannot send one cross-site
      without a CORS preflight) and, when they carry an Origin, the API's own or an allowed one.
    """

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = scope.get("client")
        if not self.settings.auth_enabled and client and not is_loopback(client[0]):
            return await _send_error(send, 403, "this API has no tokens configured and serves loopback clients "
                                     "only; set CONVTUNE_API_TOKENS to serve the network")
        if scope["method"] in STATE_CHANGING:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media not in BODY_TYPES and not media.endswith("+json"):
                return await _send_error(send, 415, f"{scope['method']} needs Content-Type: application/json (or "
                                         f"application/yaml for specs), got {media or 'none'}")
            origin = headers.get("origin")
            if origin is not None and not self._allowed_origin(origin, headers.get("host", ""), scope):
                return await _send_error(send, 403, f"requests from origin {origin} are refused; add it to "
                                         "CONVTUNE_ALLOWED_ORIGINS to allow it")
        return await self.app(scope, receive, send)

    def _allowed_origin(self, origin: str, host: str, scope) -> bool:
        own = f"{scope.get('scheme', 'http')}://{host}"
        return origin.rstrip("/") in {own, *(o.rstrip("/") for o in self.settings.allowed_origins)}


def _error(status: int, detail: str, errors: list | None = None, headers: dict | None = None):
    return JSONResponse({"detail": detail, "errors": errors or []}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SpecError)
    async def _spec(_: Request, exc: SpecError):
        return _error(422, str(exc), [e.__dict__ for e in exc.errors])

    @app.exception_handler(RequestValidationError)
    async def _request(_: Request, exc: RequestValidationError):
        errors = [{"field": ".".join(str(p) for p in e.get("loc", ())), "reason": e.get("msg", "invalid"),
                   "type": e.get("type", "value_error")} for e in exc.errors()]
        return _error(422, "invalid request: " + "; ".join(f"{e['field']}: {e['reason']}" for e in errors), errors)

    @app.exception_handler(RayUnavailable)
    async def _ray(_: Request, exc: RayUnavailable):
        return _error(503, str(exc), headers={"Retry-After": "10"})

    @app.exception_handler(MlflowUnavailable)
    async def _mlflow(_: Request, exc: MlflowUnavailable):
        return _error(503, str(exc), headers={"Retry-After": "10"})

    @app.exception_handler(JobRejected)
    async def _rejected(_: Request, exc: JobRejected):
        return _error(502, str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict):
        return _error(409, str(exc), headers={"Retry-After": str(exc.retry_after)} if exc.retry_after else None)

    @app.exception_handler(SweepNotFound)
    async def _missing(_: Request, exc: SweepNotFound):
        return _error(404, f"no sweep {exc}")

    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


def _openapi(app: FastAPI):
    """Add the SweepSpec JSON schema (from search_spaces) to the generated document."""

    def build():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        try:
            from search_spaces.spec import SweepSpec

            spec_schema = SweepSpec.model_json_schema(ref_template="#/components/schemas/{model}")
        except ImportError:  # the spec module is part of the install; guard only the docs page
            spec_schema = {"type": "object"}
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(spec_schema.pop("$defs", {}))
        components["SweepSpec"] = spec_schema
        app.openapi_schema = schema
        return schema

    return build


async def _reconcile_forever(service: SweepService, interval: float) -> None:
    """Keep active sweeps in line with Ray even when nobody is polling them."""
    while True:
        try:
            await run_in_threadpool(service.reconcile_all)
        except Exception:  # noqa: BLE001 - the loop must survive anything one pass meets
            log.exception("reconcile pass failed")
        await asyncio.sleep(interval)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.check_bind()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_reconcile_forever(app.state.sweeps, settings.reconcile_interval_s))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(
        title="convtune",
        version="0.1.0",
        description=("Submit ConvNeXtV2 finetuning sweeps (Ray Tune over Ray Train trials, logged to MLflow). "
                     "Authenticate with `Authorization: Bearer <token>` when the server has tokens configured."),
        lifespan=lifespan,
    )
    db = Database(settings.database_url)
    jobs = JobControl(settings)
    mlflow = MlflowReader(settings.mlflow_tracking_uri)
    app.state.settings, app.state.db, app.state.jobs, app.state.mlflow = settings, db, jobs, mlflow
    app.state.sweeps = SweepService(settings, db, jobs, mlflow)
    install_error_handlers(app)
    for module in (health, sweeps, search_spaces):
        app.include_router(module.router)
    app.openapi = _openapi(app)
    # outermost last: host check, then loopback/content-type/origin, then the body limit
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestGuard, settings=settings)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.trusted_hosts)
    return app
