"""The service's own copy of the trial data: a row per trial, the sweep's best trial and registered
model version on its row, and the event log the live stream tails.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sweeps") as batch:
        batch.add_column(sa.Column("best_trial_id", sa.String(128), nullable=True))
        batch.add_column(sa.Column("best_value", sa.Float(), nullable=True))
        batch.add_column(sa.Column("model_name", sa.String(256), nullable=True))
        batch.add_column(sa.Column("model_version", sa.String(32), nullable=True))
        batch.add_column(sa.Column("trials_note", sa.Text(), nullable=True))
        batch.add_column(sa.Column("synced_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last_event_id", sa.Integer(), nullable=False, server_default="0"))
    op.create_index("ix_sweeps_created_at_id", "sweeps", ["created_at", "id"])
    op.create_table(
        "trials",
        sa.Column("sweep_id", sa.String(64), sa.ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("trial_id", sa.String(128), primary_key=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("resolved_lr", sa.Float(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=True),
        sa.Column("latest_metric", sa.Float(), nullable=True),
        sa.Column("best_metric", sa.Float(), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "sweep_events",
        sa.Column("sweep_id", sa.String(64), sa.ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sweep_events")
    op.drop_table("trials")
    op.drop_index("ix_sweeps_created_at_id", "sweeps")
    with op.batch_alter_table("sweeps") as batch:
        for name in ("last_event_id", "synced_at", "trials_note", "model_version", "model_name", "best_value",
                     "best_trial_id"):
            batch.drop_column(name)
