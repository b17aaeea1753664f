"""The service's tables: a sweep record, one row per trial, and the sweep's event log.

Ray owns the job and MLflow the full trial record; these rows are the service's copy of what it
shows (kept current by the reconciler for active sweeps, frozen once a sweep is finished), so reads
never wait on Ray or MLflow."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text
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
    __table_args__ = (Index("ix_sweeps_created_at_id", "created_at", "id"),)  # the list's order, no sort

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
    # the service's copy of the trial data (revision 0002): kept by SweepService.sync_trials
    best_trial_id: Mapped[str | None] = mapped_column(String(128), default=None)
    best_value: Mapped[float | None] = mapped_column(Float, default=None)
    model_name: Mapped[str | None] = mapped_column(String(256), default=None)
    model_version: Mapped[str | None] = mapped_column(String(32), default=None)
    trials_note: Mapped[str | None] = mapped_column(Text, default=None)  # why the trial data may be incomplete
    synced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    last_event_id: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Trial(Base):
    """One trial of a sweep as the reconciler last saw its MLflow run."""

    __tablename__ = "trials"

    sweep_id: Mapped[str] = mapped_column(String(64), ForeignKey("sweeps.id", ondelete="CASCADE"),
                                          primary_key=True)
    trial_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # PENDING RUNNING FINISHED STOPPED_EARLY FAILED KILLED
    params: Mapped[dict] = mapped_column(JSON, default=dict)  # the searched params only (the spec's space keys)
    resolved_lr: Mapped[float | None] = mapped_column(Float, default=None)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)  # the latest value of each metric
    epoch: Mapped[int | None] = mapped_column(Integer, default=None)
    latest_metric: Mapped[float | None] = mapped_column(Float, default=None)
    best_metric: Mapped[float | None] = mapped_column(Float, default=None)
    outcome: Mapped[str | None] = mapped_column(String(32), default=None)  # completed early_stopped failed cancelled
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class SweepEvent(Base):
    """What the reconciler observed, in order: the `GET /v1/sweeps/{id}/events` stream replays and tails it.

    ``id`` counts per sweep (from ``Sweep.last_event_id``, bumped under the sweep row's lock), so ids
    commit in order and a stream resumed after id N misses none and repeats none."""

    __tablename__ = "sweep_events"

    sweep_id: Mapped[str] = mapped_column(String(64), ForeignKey("sweeps.id", ondelete="CASCADE"),
                                          primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
