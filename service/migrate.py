"""The service's schema, managed by Alembic (`service/migrations/`), upgraded when the API starts.

A database made by convtune 0.1.0 (tables from `create_all`, no `alembic_version`) is stamped at the
baseline revision ``0001`` first, then upgraded: existing rows are migrated, never dropped or recreated.
New revisions: `alembic -x ... revision` is not needed; copy the newest file in `versions/`, bump
``revision``/``down_revision``, and write `upgrade()`; `tests/service/test_service_migrations.py` checks
that the revisions end equal to `service/models.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine, inspect

BASELINE = "0001"
log = logging.getLogger("convtune.service")


def _config(connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config(None)).get_current_head()


def migrate(engine: Engine) -> str:
    """Bring the database to the newest revision; returns it."""
    from alembic import command

    with engine.begin() as connection:
        tables = set(inspect(connection).get_table_names())
        cfg = _config(connection)
        if "sweeps" in tables and "alembic_version" not in tables:
            log.info("database made by convtune 0.1.0: stamping it at revision %s before upgrading", BASELINE)
            command.stamp(cfg, BASELINE)
        command.upgrade(cfg, "head")
    return head()
