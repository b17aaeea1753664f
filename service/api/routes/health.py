"""Liveness and readiness (no auth: load balancers and `convtune up` poll these). Readiness details
(internal URLs, error text) go only to callers with a valid token, or to anyone while auth is off
(then only loopback clients are served at all)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.api.deps import token_scopes
from service.api.schemas import ComponentHealth, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, summary="Ray, MLflow and the database answer",
            responses={503: {"model": Readiness}})
async def readyz(request: Request):
    state = request.app.state
    checks = {"database": state.db.ping, "ray": state.jobs.ping, "mlflow": state.mlflow.ping}
    components = {}
    for name, check in checks.items():
        try:
            detail = await run_in_threadpool(check)
            components[name] = ComponentHealth(ok=True, detail=str(detail or "ok"))
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which
            components[name] = ComponentHealth(ok=False, detail=str(exc))
    settings = state.settings
    if settings.auth_enabled and token_scopes(settings, request.headers.get("authorization")) is None:
        components = {name: ComponentHealth(ok=c.ok, detail="ok" if c.ok else "unavailable")
                      for name, c in components.items()}
    body = Readiness(ready=all(c.ok for c in components.values()), components=components)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)
