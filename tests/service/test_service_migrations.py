"""The service schema is managed by Alembic: an install made by convtune 0.1.0 (create_all, no
alembic_version) keeps every sweep when the API starts, and the revisions end equal to the models."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text, create_engine, inspect, text

# The sweeps table of convtune 0.1.0, frozen here as its service/models.py declared it (commit 3e6e944), so
# that later model changes and migrations are tested against the schema real installs have, not today's.
V010 = MetaData()
V010_SWEEPS = Table(
    "sweeps", V010,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("message", Text),
    Column("spec_json", Text, nullable=False),
    Column("spec_hash", String(64), nullable=False),
    Column("idempotency_key", String(200), unique=True),
    Column("owner", String(64)),
    Column("total_trials", Integer),
    Column("attempt", Integer, nullable=False),
    Column("ray_job_id", String(128), nullable=False),
    Column("mlflow_experiment_id", String(64)),
    Column("mlflow_parent_run_id", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
)
CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def old_install(url: str, n: int = 5) -> list[str]:
    """A database as convtune 0.1.0 left it: its create_all tables, sweeps in it, no alembic_version."""
    engine = create_engine(url)
    V010.create_all(engine)
    ids = [f"sw-{i:012x}" for i in range(n)]
    with engine.begin() as conn:
        conn.execute(V010_SWEEPS.insert(), [
            {"id": i, "name": f"old-{k}", "status": "SUCCEEDED", "spec_json": json.dumps({"name": f"old-{k}"}),
             "spec_hash": "0" * 64, "idempotency_key": f"key-{k}", "owner": "local", "total_trials": 3,
             "attempt": 1, "ray_job_id": i, "mlflow_experiment_id": str(k), "mlflow_parent_run_id": f"run-{k}",
             "created_at": CREATED, "updated_at": CREATED, "finished_at": CREATED} for k, i in enumerate(ids)])
    engine.dispose()
    return ids


def at_revision(url: str, revision: str) -> None:
    """Bring an empty database to ``revision`` (what that release's `convtune serve` left)."""
    from alembic import command

    from service.migrate import _config

    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(_config(conn), revision)
    engine.dispose()


def insert_sweeps(url: str, n: int, status: str = "SUCCEEDED") -> list[str]:
    """``n`` sweep rows with only the columns revision 0001 has."""
    ids = [f"sw-{i:012x}" for i in range(n)]
    sweeps = Table("sweeps", MetaData(), autoload_with=(engine := create_engine(url)))
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(sweeps.insert(), [
            {"id": i, "name": f"old-{k}", "status": status, "spec_json": json.dumps({"name": f"old-{k}"}),
             "spec_hash": "0" * 64, "idempotency_key": f"key-{k}", "owner": "local", "total_trials": 3,
             "attempt": 1, "ray_job_id": i, "created_at": now, "updated_at": now,
             "finished_at": now if status == "SUCCEEDED" else None} for k, i in enumerate(ids)])
    engine.dispose()
    return ids


def test_an_existing_install_is_stamped_and_upgraded_without_losing_sweeps(database_url):
    from service.db import Database
    from service.migrate import head

    url = database_url
    ids = old_install(url)
    db = Database(url)  # what `convtune serve` / `convtune up` do on start
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head()
        rows = conn.execute(text("SELECT id, name, idempotency_key, spec_json, mlflow_parent_run_id, total_trials "
                                 "FROM sweeps ORDER BY id")).all()
    assert [r.id for r in rows] == ids
    assert [(r.name, r.idempotency_key, r.mlflow_parent_run_id, r.total_trials) for r in rows] == [
        (f"old-{k}", f"key-{k}", f"run-{k}", 3) for k in range(len(ids))]
    assert json.loads(rows[1].spec_json) == {"name": "old-1"}
    Database(url)  # starting again changes nothing
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sweeps")).scalar() == len(ids)


def test_a_database_at_0001_with_sweeps_upgrades_to_head_and_loses_none(database_url):
    """0001 -> 0002 (trials, events, the sweep's best trial and model version): every sweep and every 0001 column
    kept; the new columns start empty and the new tables take rows for the old sweeps."""
    from service.db import Database
    from service.models import SweepEvent, Trial
    from service.sweeps import SweepService

    at_revision(database_url, "0001")
    finished = insert_sweeps(database_url, 4)
    running = [f"sw-{0xabc0 + i:012x}" for i in range(2)]
    engine = create_engine(database_url)
    with engine.begin() as conn:
        before = {r.id: r for r in conn.execute(text("SELECT * FROM sweeps")).all()}
        conn.execute(text("UPDATE sweeps SET id = :new, status = 'RUNNING', finished_at = NULL WHERE id = :old"),
                     [{"new": new, "old": old} for new, old in zip(running, finished[:2], strict=True)])
    engine.dispose()
    db = Database(database_url)  # migrates to head
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"
        after = {r.id: r for r in conn.execute(text("SELECT * FROM sweeps")).all()}
    assert sorted(after) == sorted(finished[2:] + running)
    for sweep_id in finished[2:]:
        old, new = before[sweep_id]._mapping, after[sweep_id]._mapping
        assert all(new[col] == value for col, value in old.items()), sweep_id
        assert new["last_event_id"] == 0 and new["best_trial_id"] is None and new["model_version"] is None
    with db.session() as s:  # the new tables work for the old rows
        s.add(Trial(sweep_id=running[0], trial_id="t1", run_id="r1", status="RUNNING", params={"blr": "0.001"},
                    metrics={"val_top1": 50.0}, epoch=1, latest_metric=50.0))
        s.commit()
    service = SweepService(None, db, None, None)
    sweep, best, counts = service.detail_parts(running[0])
    assert sweep.status == "RUNNING" and counts == {"RUNNING": 1}
    with db.session() as s:
        service._append_events(s, running[0], [("trial_started", {"trial_id": "t1"})])
        s.commit()
    row, events = service.events_after(running[0], 0)
    assert row.last_event_id == 1 and [(e.id, e.type) for e in events] == [(1, "trial_started")]
    assert service.events_after(running[1], 0)[1] == [] and SweepEvent.__tablename__ == "sweep_events"


def test_the_migrations_build_exactly_the_models_schema(database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from service.db import Database
    from service.models import Base

    db = Database(database_url)
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"service/models.py and service/migrations differ: {diff}"
    assert {"alembic_version", "sweeps", "trials", "sweep_events"} <= set(inspect(db.engine).get_table_names())


def test_the_baseline_revision_is_the_010_schema(database_url):
    """Stamping a 0.1.0 database at 0001 is right only if 0001 builds exactly the 0.1.0 tables."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from service.migrate import BASELINE, _config

    engine = create_engine(database_url)
    with engine.begin() as conn:
        command.upgrade(_config(conn), BASELINE)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), V010)
    engine.dispose()
    assert diff == [], f"revision {BASELINE} differs from the 0.1.0 schema: {diff}"


def test_the_api_migrates_on_start(tmp_path, helpers, database_url):
    """`convtune serve` on a 0.1.0 database: the sweeps are there over HTTP."""
    import httpx

    data = tmp_path / "data"
    data.mkdir()
    ids = old_install(database_url, n=3)
    env = helpers.service_env(data, f"http://127.0.0.1:{helpers.free_port()}",
                              f"http://127.0.0.1:{helpers.free_port()}", CONVTUNE_DATABASE_URL=database_url)
    api = helpers.ApiProcess(env, tmp_path / "api.log").start()
    try:
        page = httpx.get(f"{api.url}/v1/sweeps", timeout=30).json()
        assert sorted(item["id"] for item in page["items"]) == ids
        assert sorted(item["name"] for item in page["items"]) == [f"old-{k}" for k in range(len(ids))]
    finally:
        api.kill()
