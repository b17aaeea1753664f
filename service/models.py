"""The service's one table: a sweep record. Trial data lives in MLflow, job state in Ray."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import DateTime, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class SweepStatus(enum.StrEnum):
    SUBMITTING = "SUBMITTING"  # row written, Ray job not yet confirmed
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"  # cancel requested, the driver is saving state
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL

    @property
    def is_resumable(self) -> bool:
        return self in (SweepStatus.STOPPED, SweepStatus.FAILED)


TERMINAL = frozenset({SweepStatus.STOPPED, SweepStatus.SUCCEEDED, SweepStatus.FAILED})
ACTIVE = frozenset(set(SweepStatus) - TERMINAL)


class Sweep(Base):
    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True, default=SweepStatus.SUBMITTING)
    message: Mapped[str | None] = mapped_column(Text, default=None)
    spec_json: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True, default=None)
    owner: Mapped[str | None] = mapped_column(String(64), default=None)
    total_trials: Mapped[int | None] = mapped_column(Integer, default=None)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    ray_job_id: Mapped[str] = mapped_column(String(128))
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64), default=None)
    mlflow_parent_run_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
