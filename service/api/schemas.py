"""Response bodies of the REST API (request bodies are sweep specs, see search_spaces.spec)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class FieldErrorOut(BaseModel):
    field: str = Field(description="Dotted path of the offending field, e.g. search_space.base_lr.low")
    reason: str
    type: str


class ErrorOut(BaseModel):
    detail: str
    errors: list[FieldErrorOut] = []


class Links(BaseModel):
    self: str
    trials: str
    logs: str
    mlflow: str | None = Field(None, description="The sweep's parent run in the MLflow UI (once it exists)")
    ray: str = Field(description="The Ray job in the Ray dashboard")


class SweepSummary(BaseModel):
    id: str
    name: str
    status: str
    attempt: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    owner: str | None = None


class SweepPage(BaseModel):
    items: list[SweepSummary]
    total: int
    limit: int
    offset: int
    next_offset: int | None = None


class SweepCreated(BaseModel):
    id: str
    status: str
    created: bool = Field(description="False when an Idempotency-Key matched an earlier submission")
    links: Links


class Progress(BaseModel):
    total: int
    finished: int
    running: int
    pending: int
    stopped_early: int
    failed: int
    killed: int


class TrialOut(BaseModel):
    trial_id: str
    run_id: str
    status: str
    params: dict[str, str] = Field(description="The searched params (the spec's space keys), as MLflow keeps them")
    metrics: dict[str, float] = Field(description="The latest value of each metric")
    epoch: int | None = None
    best_metric: float | None = Field(None, description="The best value of the sweep's metric so far")
    outcome: str | None = Field(None, description="completed, early_stopped, failed or cancelled, once ended")
    lr: float | None = Field(None, description="The resolved learning rate (base LR scaled by the batch)")
    started_at: datetime | None = None
    ended_at: datetime | None = None


class SweepDetail(SweepSummary):
    message: str | None = None
    ray_job_id: str
    metric: str
    mode: str
    progress: Progress | None = None
    best_trial: TrialOut | None = None
    model_name: str | None = Field(None, description="The registered model the winner went to (register_model)")
    model_version: str | None = Field(None, description="Its version in the MLflow Model Registry")
    links: Links
    spec: dict[str, Any]
    warnings: list[str] = []


class TrialTable(BaseModel):
    sweep_id: str
    metric: str
    mode: str
    trials: list[TrialOut]
    warnings: list[str] = Field(default_factory=list)


class Preset(BaseModel):
    name: str
    description: str | None = None
    spec: dict[str, Any]


class ComponentHealth(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    ready: bool
    components: dict[str, ComponentHealth]
