"""Alembic environment: runs on the connection `service.migrate.migrate` hands over (no alembic.ini)."""

from __future__ import annotations

from alembic import context

from service.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copying
with context.begin_transaction():
    context.run_migrations()
