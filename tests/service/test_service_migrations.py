"""The service schema is managed by Alembic: an install made by convtune 0.1.0 (create_all, no
alembic_version) keeps every sweep when the API starts, and the revisions end equal to the models."""

from __future__ import annotations

import json

from sqlalchemy import create_engine, inspect, text


def old_install(url: str, n: int = 5) -> list[str]:
    """A database as convtune 0.1.0 left it: tables from create_all, sweeps in it, no alembic_version."""
    from service.models import Base, Sweep

    engine = create_engine(url)
    Base.metadata.create_all(engine)
    ids = [f"sw-{i:012x}" for i in range(n)]
    with engine.begin() as conn:
        conn.execute(Sweep.__table__.insert(), [
            {"id": i, "name": f"old-{k}", "status": "SUCCEEDED", "spec_json": json.dumps({"name": f"old-{k}"}),
             "spec_hash": "0" * 64, "idempotency_key": f"key-{k}", "owner": "local", "total_trials": 3,
             "attempt": 1, "ray_job_id": i} for k, i in enumerate(ids)])
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
        rows = conn.execute(text("SELECT id, name, idempotency_key FROM sweeps ORDER BY id")).all()
    assert [r.id for r in rows] == ids and rows[0].name == "old-0" and rows[0].idempotency_key == "key-0"
    Database(url)  # starting again changes nothing
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sweeps")).scalar() == len(ids)


def test_the_migrations_build_exactly_the_models_schema(database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from service.db import Database
    from service.models import Base

    db = Database(database_url)
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"service/models.py and service/migrations differ: {diff}"
    assert {"alembic_version", "sweeps"} <= set(inspect(db.engine).get_table_names())


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
    finally:
        api.kill()
