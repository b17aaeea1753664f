"""What the API does with sweeps: submit, reconcile with Ray and MLflow, cancel, resume, read.

Ray owns the job's state and MLflow the full trial record; the service keeps its own copy of what it
shows (the sweep row, one row per trial, the event log) so that reads are database reads. The
reconciler (:meth:`SweepService.reconcile_all`) keeps the copy of *active* sweeps current; a sweep
that ends gets one final sync and is then read from the database alone. Every mutation is a
compare-and-set on the row's status, so concurrent requests and several API workers agree, and a
restart finds everything it needs in the database.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from service.db import Database
from service.jobs import JobControl, JobNotFound, RayUnavailable, attempt_job_id
from service.mlflow_reader import MlflowReader, MlflowUnavailable, SweepRuns
from service.models import ACTIVE, Sweep, SweepEvent, SweepStatus, Trial, utcnow
from service.settings import Settings
from service.specs import CheckedSpec, check_fits
from service.trials import best_summary, best_trial, merge, trial_values

log = logging.getLogger("convtune.service")

RAY_TO_SWEEP = {
    "PENDING": SweepStatus.PENDING,
    "RUNNING": SweepStatus.RUNNING,
    "STOPPED": SweepStatus.STOPPED,
    "SUCCEEDED": SweepStatus.SUCCEEDED,
    "FAILED": SweepStatus.FAILED,
}
# a row left SUBMITTING longer than this lost its API process between the DB write and the submit
SUBMIT_GRACE = timedelta(seconds=30)
CANCELLED_IN_SUBMIT = "cancelled while its job was being submitted"
# trial statuses as the progress counts them
PROGRESS_BUCKETS = {
    "FINISHED": "finished", "RUNNING": "running", "STOPPED_EARLY": "stopped_early",
    "FAILED": "failed", "KILLED": "killed", "PENDING": "pending",
}
TRIAL_FIELDS = tuple(c.name for c in Trial.__table__.columns if c.name != "sweep_id")
SUMMARY_COLUMNS = (Sweep.id, Sweep.name, Sweep.status, Sweep.attempt, Sweep.created_at, Sweep.updated_at,
                   Sweep.finished_at, Sweep.owner)
REGISTERED_NAME, REGISTERED_VERSION = "registered_model_name", "registered_model_version"  # search_spaces.registry


class SweepNotFound(LookupError):
    pass


class Conflict(RuntimeError):
    """The action does not fit the sweep's state (answers 409, with Retry-After when set)."""

    retry_after: int | None = None


class JobRejected(RuntimeError):
    """Ray answered but refused the job (answers 502)."""


@dataclass
class SubmitResult:
    sweep: Sweep
    created: bool


def new_sweep_id() -> str:
    return f"sw-{uuid.uuid4().hex[:12]}"


def spec_attr(spec_data: dict, *names, default=None):
    """Read a top-level or nested (``tune.metric``) field from a spec's JSON form."""
    for name in names:
        node = spec_data
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None:
            return node
    return default


def objective(spec_data: dict) -> tuple[str, str]:
    metric = spec_attr(spec_data, "metric", default="val_top1")
    mode = spec_attr(spec_data, "mode", default="max")
    return str(metric), str(mode)


class SweepService:
    def __init__(self, settings: Settings, db: Database, jobs: JobControl, mlflow: MlflowReader):
        self.settings, self.db, self.jobs, self.mlflow = settings, db, jobs, mlflow

    # --- reads
    def get(self, sweep_id: str) -> Sweep:
        with self.db.session() as s:
            sweep = s.get(Sweep, sweep_id)
        if sweep is None:
            raise SweepNotFound(sweep_id)
        return sweep

    def trials(self, sweep_id: str) -> tuple[Sweep, list[Trial]]:
        """The row and its stored trials, in the order they were created, read in one session."""
        with self.db.session() as s:
            sweep = s.get(Sweep, sweep_id)
            if sweep is None:
                raise SweepNotFound(sweep_id)
            return sweep, list(s.scalars(select(Trial).where(Trial.sweep_id == sweep_id)
                                         .order_by(Trial.started_at, Trial.trial_id)))

    def detail_parts(self, sweep_id: str) -> tuple[Sweep, Trial | None, dict[str, int]]:
        """The row, its best trial and the trial counts by status, read in one session."""
        with self.db.session() as s:
            sweep = s.get(Sweep, sweep_id)
            if sweep is None:
                raise SweepNotFound(sweep_id)
            best = s.get(Trial, (sweep_id, sweep.best_trial_id)) if sweep.best_trial_id else None
            counts = dict(s.execute(select(Trial.status, func.count()).where(Trial.sweep_id == sweep_id)
                                    .group_by(Trial.status)).all())
        return sweep, best, counts

    def events_after(self, sweep_id: str, after: int, limit: int = 500) -> tuple[Sweep, list[SweepEvent]]:
        """The row, then the events after id ``after``: read in this order, so when the row says the sweep is
        finalized, every event it will ever have (written with finished_at, in one commit) is in the list."""
        with self.db.session() as s:
            sweep = s.get(Sweep, sweep_id)
            if sweep is None:
                raise SweepNotFound(sweep_id)
            s.expunge(sweep)
            events = list(s.scalars(select(SweepEvent).where(SweepEvent.sweep_id == sweep_id, SweepEvent.id > after)
                                    .order_by(SweepEvent.id).limit(limit)))
        return sweep, events

    def list(self, statuses: list[str] | None, limit: int, offset: int,
             owners: Iterable[str] | None = None) -> tuple[list, int]:
        """Newest first; only sweeps of ``owners`` when given (None: everyone's). The summary columns only (rows
        with those attributes): no spec text, no ORM objects, as the list is the most requested page."""
        query = select(*SUMMARY_COLUMNS)
        count = select(func.count()).select_from(Sweep)
        if owners is not None:
            query = query.where(Sweep.owner.in_(list(owners)))
            count = count.where(Sweep.owner.in_(list(owners)))
        if statuses:
            query = query.where(Sweep.status.in_(statuses))
            count = count.where(Sweep.status.in_(statuses))
        query = query.order_by(Sweep.created_at.desc(), Sweep.id.desc()).limit(limit).offset(offset)
        with self.db.session() as s:  # (a count(*) OVER () column is slower on SQLite: it sorts every row)
            return list(s.execute(query).all()), int(s.scalar(count) or 0)

    # --- submit
    def submit(self, checked: CheckedSpec, *, idempotency_key: str | None, owner: str | None) -> SubmitResult:
        if idempotency_key:
            idempotency_key = scoped_key(self.settings, owner, idempotency_key)
            existing = self._by_key(idempotency_key)
            if existing is not None:
                return SubmitResult(self._replayed(existing, checked), created=False)
        self.require_backends()  # nothing is written unless Ray and MLflow answer
        check_fits(checked, self.jobs.cluster_resources())
        sweep_id = new_sweep_id()
        name = str(spec_attr(checked.data, "name", default=sweep_id))[:200]
        row = Sweep(id=sweep_id, name=name, status=SweepStatus.SUBMITTING, spec_json=checked.canonical_json,
                    spec_hash=checked.spec_hash, total_trials=checked.total_trials, idempotency_key=idempotency_key, owner=owner, attempt=1,
                    ray_job_id=attempt_job_id(sweep_id, 1))
        try:
            with self.db.session() as s:
                s.add(row)
                s.commit()
        except IntegrityError:  # a concurrent request with the same key won the race
            existing = self._by_key(idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return SubmitResult(self._replayed(existing, checked), created=False)
        try:
            self._submit_job(row, resume=False)
        except Exception as exc:
            if not self._job_exists_after_failed_submit(row, exc):
                with self.db.session() as s:  # nothing half-created: the row goes with the failed submit
                    s.execute(Sweep.__table__.delete().where(Sweep.id == sweep_id))
                    s.commit()
                raise
        return SubmitResult(self._submitted(sweep_id, row.ray_job_id), created=True)

    def _submitted(self, sweep_id: str, job_id: str) -> Sweep:
        """The row once Ray has its job: PENDING, unless the reconciler got there first (it moves a SUBMITTING
        row whose job exists on to the job's status) or a cancel came in meanwhile. Only the cancel, recorded as
        STOPPING with CANCELLED_IN_SUBMIT, stops the job here."""
        pending = self._set_status(sweep_id, SweepStatus.PENDING, expect=[SweepStatus.SUBMITTING])
        if pending is not None:
            return pending
        current = self.get(sweep_id)
        if current.status == SweepStatus.STOPPING and current.message == CANCELLED_IN_SUBMIT:
            with contextlib.suppress(JobNotFound, RayUnavailable):
                self.jobs.stop(job_id)
        return current

    def _job_exists_after_failed_submit(self, row: Sweep, exc: Exception) -> bool:
        """A submit can fail after Ray accepted the job (a timeout on the answer): ask Ray before dropping the
        row, so no job runs untracked. True: the job exists (the row stays). Unknown (Ray unreachable): the row
        stays SUBMITTING for the reconciler, and the caller learns the outcome is pending."""
        try:
            self.jobs.state(row.ray_job_id)
        except JobNotFound:
            return False
        except Exception:  # noqa: BLE001 - Ray cannot tell now: keep tracking the sweep rather than lose a job
            log.warning("sweep %s: submit failed (%s) and Ray cannot say whether the job exists; the "
                        "reconciler will finish the submission", row.id, exc)
            raise RayUnavailable(f"the submission of sweep {row.id} failed ({exc}) and Ray cannot say yet whether "
                                 f"the job started; the sweep is tracked as {row.id} and will be reconciled") from exc
        log.warning("sweep %s: submit raised %s but Ray has the job; tracking it", row.id, exc)
        return True

    def _by_key(self, key: str) -> Sweep | None:
        with self.db.session() as s:
            return s.scalar(select(Sweep).where(Sweep.idempotency_key == key))

    @staticmethod
    def _replayed(existing: Sweep, checked: CheckedSpec) -> Sweep:
        """The answer to a replayed Idempotency-Key: the same sweep, once its first submission is settled."""
        if existing.spec_hash != checked.spec_hash:
            raise Conflict(f"Idempotency-Key already used for sweep {existing.id} with a different spec; "
                           "use a new key for a new sweep")
        if existing.status == SweepStatus.SUBMITTING and existing.attempt == 1:
            conflict = Conflict(f"the first submission with this Idempotency-Key (sweep {existing.id}) is still in "
                                "progress; retry in a few seconds")
            conflict.retry_after = 2
            raise conflict
        return existing

    def require_backends(self) -> None:
        self.jobs.ping()
        self.mlflow.ping()

    def _submit_job(self, sweep: Sweep, resume: bool) -> None:
        metadata = {"convtune_sweep_id": sweep.id, "convtune_attempt": sweep.attempt,
                    "convtune_owner": self.settings.owner_tag(sweep.owner)}
        try:
            self.jobs.submit(job_id=sweep.ray_job_id, sweep_id=sweep.id, spec_json=sweep.spec_json,
                             resume=resume, metadata=metadata)
        except RayUnavailable:
            raise
        except Exception as exc:
            raise JobRejected(f"Ray refused the job for sweep {sweep.id}: {exc}") from exc

    def _set_status(self, sweep_id: str, status: SweepStatus, *, expect=None, **values) -> Sweep | None:
        """Compare-and-set: update only while the row is in one of ``expect``; the row, or None."""
        stmt = update(Sweep).where(Sweep.id == sweep_id).values(status=status, updated_at=utcnow(), **values)
        if expect is not None:
            stmt = stmt.where(Sweep.status.in_([str(e) for e in expect]))
        with self.db.session() as s:
            changed = s.execute(stmt).rowcount
            if changed and not status.is_terminal:  # a terminal status is announced by the final sync (_finalize)
                self._append_events(s, sweep_id, [("sweep", self._status_event(s, s.get(Sweep, sweep_id)))])
            s.commit()
            return s.get(Sweep, sweep_id, populate_existing=True) if changed else None

    # --- reconcile
    def reconcile(self, sweep: Sweep) -> Sweep:
        """Bring one active row in line with Ray; finish MLflow runs a killed driver left open."""
        status = SweepStatus(sweep.status)
        if status.is_terminal:
            return self._finalize(sweep) if sweep.finished_at is None else sweep
        try:
            state = self.jobs.state(sweep.ray_job_id)
        except JobNotFound:
            if status is SweepStatus.SUBMITTING:
                created = sweep.updated_at if sweep.updated_at.tzinfo else sweep.updated_at.replace(tzinfo=UTC)
                if utcnow() - created > SUBMIT_GRACE:  # the API died mid-submit: finish what it started
                    self._submit_job(sweep, resume=sweep.attempt > 1)
                return sweep
            if status is SweepStatus.STOPPING and sweep.message == CANCELLED_IN_SUBMIT:
                if utcnow() - as_utc(sweep.updated_at) <= SUBMIT_GRACE:
                    return sweep  # the submit may still land (it stops its job then)
                updated = self._set_status(sweep.id, SweepStatus.STOPPED, expect=[status],
                                           message="cancelled before its job started")
                return self._finalize(updated) if updated else self.get(sweep.id)
            updated = self._set_status(sweep.id, SweepStatus.FAILED, expect=[status], message=(
                f"Ray no longer knows job {sweep.ray_job_id} (the cluster restarted?); "
                f"resume it with POST /v1/sweeps/{sweep.id}/resume"))
            return self._finalize(updated) if updated else self.get(sweep.id)
        target = RAY_TO_SWEEP.get(state.status, status)
        if status is SweepStatus.STOPPING and not target.is_terminal:
            return sweep  # the driver is still saving state
        if target is status and (state.message or None) == sweep.message:
            return sweep
        updated = self._set_status(sweep.id, target, expect=[status], message=state.message)
        if updated and target.is_terminal:
            return self._finalize(updated)
        return updated or self.get(sweep.id)

    def _finalize(self, sweep: Sweep) -> Sweep:
        """Terminal now: end any run still RUNNING, sync the trials a last time and stamp finished_at with the
        terminal ``sweep`` event (retried until MLflow answers). From then on the sweep is read from the
        database alone."""
        try:
            runs = self._read_runs(sweep)
            ended = self.mlflow.finalize(sweep.id, runs, "FAILED" if sweep.status == SweepStatus.FAILED else "KILLED")
            if ended:
                log.info("sweep %s: ended %d MLflow run(s) the driver left RUNNING", sweep.id, ended)
                runs = self._read_runs(sweep)
        except (MlflowUnavailable, LookupError) as exc:
            log.warning("sweep %s: cannot finalize MLflow runs yet: %s", sweep.id, exc)
            return sweep
        return self.sync_trials(sweep, runs, final=True)

    def _read_runs(self, sweep: Sweep) -> SweepRuns:
        return self.mlflow.sweep_runs(sweep.id, experiment_name(sweep), sweep.mlflow_experiment_id,
                                      sweep.mlflow_parent_run_id, use_cache=False)

    # --- the service's copy of the trial data
    def refresh_trials(self, sweep: Sweep) -> Sweep:
        """Sync an active sweep's trials from MLflow (the reconciler, every pass)."""
        try:
            runs = self._read_runs(sweep)
        except MlflowUnavailable as exc:
            note = f"trial data may be stale: {exc}"[:1000]
            with self.db.session() as s:
                s.execute(update(Sweep).where(Sweep.id == sweep.id, Sweep.trials_note.is_distinct_from(note))
                          .values(trials_note=note))
                s.commit()
            return sweep
        return self.sync_trials(sweep, runs)

    def sync_trials(self, sweep: Sweep, runs: SweepRuns, *, final: bool = False) -> Sweep:
        """Store what MLflow says about the sweep's trials and append the events the changes make, in one
        transaction that holds the sweep row's lock (its first statement writes the row), so two reconcilers
        never interleave their events. ``final``: the sweep ended; stamp finished_at and announce its status."""
        data = spec_data(sweep)
        metric, mode = objective(data)
        space = set(data.get("space") or ())
        with self.db.session() as s:
            lock = update(Sweep).where(Sweep.id == sweep.id).values(synced_at=utcnow(), updated_at=Sweep.updated_at)
            if final:
                lock = lock.where(Sweep.finished_at.is_(None))
            if not s.execute(lock).rowcount:  # gone, or another worker finalized it first
                s.rollback()
                return self.get(sweep.id)
            row = s.get(Sweep, sweep.id)
            stored = {t.trial_id: t for t in s.scalars(select(Trial).where(Trial.sweep_id == sweep.id))}
            events: list[tuple[str, dict]] = []
            for record in runs.trials:
                old = stored.get(record.trial_id)
                values, changes = merge(trial_dict(old) if old else None, trial_values(record, space, metric), mode)
                events += changes
                if old is None:
                    stored[record.trial_id] = Trial(sweep_id=sweep.id, **values)
                    s.add(stored[record.trial_id])
                elif values != trial_dict(old):
                    for name, value in values.items():
                        setattr(old, name, value)
            best = best_trial([trial_dict(t) for t in stored.values()], mode)
            sweep_values = {
                "best_trial_id": best["trial_id"] if best else None, "best_value": best["latest_metric"] if best else None,
                "model_name": runs.parent_tags.get(REGISTERED_NAME) or row.model_name,
                "model_version": runs.parent_tags.get(REGISTERED_VERSION) or row.model_version,
                "trials_note": runs.missing,
                "mlflow_experiment_id": runs.experiment_id or row.mlflow_experiment_id,
                "mlflow_parent_run_id": runs.parent_run_id or row.mlflow_parent_run_id,
            }
            changed = {k: v for k, v in sweep_values.items() if getattr(row, k) != v}
            best_moved = {"best_trial_id", "best_value", "model_version"} & set(changed)
            for name, value in changed.items():
                setattr(row, name, value)
            if final:
                row.finished_at = utcnow()
            if changed or final:
                row.updated_at = utcnow()
            s.flush()
            if final or best_moved:
                events.append(("sweep", self._status_event(s, row)))
            self._append_events(s, sweep.id, events)
            s.commit()
            return s.get(Sweep, sweep.id, populate_existing=True)

    def status_event(self, sweep_id: str) -> dict:
        """A ``sweep`` event's data for the sweep as it is now (the snapshot an event stream opens with)."""
        with self.db.session() as s:
            sweep = s.get(Sweep, sweep_id)
            if sweep is None:
                raise SweepNotFound(sweep_id)
            return self._status_event(s, sweep)

    def _status_event(self, s, sweep: Sweep) -> dict:
        """The data of a ``sweep`` event: status, message, the best trial (searched params and LR), model version."""
        metric, _ = objective(spec_data(sweep))
        best = s.get(Trial, (sweep.id, sweep.best_trial_id)) if sweep.best_trial_id else None
        return {"sweep_id": sweep.id, "status": sweep.status, "message": sweep.message, "attempt": sweep.attempt,
                "best": best_summary(trial_dict(best) if best else None, metric), "model_version": sweep.model_version}

    @staticmethod
    def _append_events(s, sweep_id: str, events: list[tuple[str, dict]]) -> None:
        """Number and add ``events`` after the sweep's last one. The caller's session holds the sweep row's lock
        (it wrote the row), so ids are handed out and committed in order: a reader never sees id N+1 before N."""
        if not events:
            return
        last = s.scalar(select(Sweep.last_event_id).where(Sweep.id == sweep_id)) or 0
        now = utcnow()
        s.add_all([SweepEvent(sweep_id=sweep_id, id=last + i, type=kind, data=data, created_at=now)
                   for i, (kind, data) in enumerate(events, start=1)])
        s.execute(update(Sweep).where(Sweep.id == sweep_id).values(last_event_id=last + len(events),
                                                                    updated_at=Sweep.updated_at))

    def reconcile_all(self) -> int:
        """One pass over every row that is active or not yet finalized; returns how many changed."""
        with self.db.session() as s:
            rows = list(s.scalars(select(Sweep).where(
                (Sweep.status.in_([str(x) for x in ACTIVE])) | (Sweep.finished_at.is_(None)))))
        changed = 0
        for row in rows:
            try:
                after = self.reconcile(row)
                if SweepStatus(after.status) in ACTIVE:
                    after = self.refresh_trials(after)
            except RayUnavailable:
                return changed  # nothing to learn until Ray is back
            except Exception:  # noqa: BLE001 - one bad row must not stop the others
                log.exception("reconciling sweep %s failed", row.id)
                continue
            changed += int(after.status != row.status)
        return changed

    # --- control
    def cancel(self, sweep_id: str) -> Sweep:
        sweep = self.reconcile(self.get(sweep_id))
        status = SweepStatus(sweep.status)
        if status is SweepStatus.STOPPING:
            return sweep
        if status.is_terminal:
            raise Conflict(f"sweep {sweep_id} is already {status.value}; nothing to cancel")
        try:
            self.jobs.stop(sweep.ray_job_id)
        except JobNotFound:
            if status is not SweepStatus.SUBMITTING:
                raise
            # its job is not in Ray yet: the submit in flight stops it on arrival (it finds the row cancelled),
            # and the reconciler ends the row STOPPED if no job ever comes
            return self._set_status(sweep_id, SweepStatus.STOPPING, expect=[status],
                                    message=CANCELLED_IN_SUBMIT) or self.get(sweep_id)
        return self._set_status(sweep_id, SweepStatus.STOPPING, expect=[status],
                                message="cancel requested: the driver is saving its state") or self.get(sweep_id)

    def resume(self, sweep_id: str) -> Sweep:
        sweep = self.reconcile(self.get(sweep_id))
        status = SweepStatus(sweep.status)
        if not status.is_resumable:
            raise Conflict(f"sweep {sweep_id} is {status.value}; only STOPPED or FAILED sweeps can be resumed")
        self.require_backends()
        attempt = sweep.attempt + 1
        claimed = self._set_status(sweep_id, SweepStatus.SUBMITTING, expect=[status], attempt=attempt,
                                   ray_job_id=attempt_job_id(sweep_id, attempt), finished_at=None,
                                   message=f"resuming (attempt {attempt})")
        if claimed is None:
            raise Conflict(f"sweep {sweep_id} changed state during the resume; try again")
        try:
            self._submit_job(claimed, resume=True)
        except Exception:
            with self.db.session() as s:  # roll the claim back: the sweep stays as it was
                s.execute(update(Sweep).where(Sweep.id == sweep_id).values(
                    status=sweep.status, attempt=sweep.attempt, ray_job_id=sweep.ray_job_id,
                    finished_at=sweep.finished_at, message=sweep.message))
                s.commit()
            raise
        return self._submitted(sweep_id, claimed.ray_job_id)

    @staticmethod
    def progress(total: int | None, counts: dict[str, int]) -> dict:
        """Trial counts by bucket from the stored trials' counts by status."""
        progress = dict.fromkeys(("finished", "running", "pending", "stopped_early", "failed", "killed"), 0)
        for status, n in counts.items():
            progress[PROGRESS_BUCKETS.get(status, "running")] += n
        seen = sum(counts.values())
        if total:  # trials Tune has not created yet are pending too
            progress["pending"] += max(0, total - seen)
        progress["total"] = total if total else seen
        return progress


def trial_dict(trial: Trial) -> dict:
    """A stored trial as :func:`service.trials.merge` compares it (times in UTC: SQLite returns them naive)."""
    values = {name: getattr(trial, name) for name in TRIAL_FIELDS}
    values["started_at"], values["ended_at"] = as_utc(values["started_at"]), as_utc(values["ended_at"])
    return values


def scoped_key(settings: Settings, owner: str | None, key: str) -> str:
    """An Idempotency-Key as stored: scoped to its owner (two owners may use the same key) and keyed by the
    server secret, within the column's 200 characters."""
    digest = hmac.new(settings.owner_secret(), f"{owner or ''}\0{key}".encode(), hashlib.sha256).hexdigest()
    return f"k1:{digest}"


def experiment_name(sweep: Sweep) -> str:
    """The MLflow experiment the driver logs the sweep to (SweepSpec.experiment_name)."""
    data = spec_data(sweep)
    return data.get("mlflow_experiment") or f"convtune-{data.get('name', sweep.name)}"


def spec_data(sweep: Sweep) -> dict:
    return json.loads(sweep.spec_json)


def as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
