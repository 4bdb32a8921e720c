"""experiments

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

Issue 23's live canary: one row per experiment (a candidate adapter version served to a sticky
share of a segment's users beside the incumbent), at most one running per segment.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
additive: bool = True  # one new table and its indexes


def upgrade() -> None:
    string = sqlmodel.sql.sqltypes.AutoString
    when = sqlmodel.sql.sqltypes.UTCDateTime
    op.create_table(
        "experiment",
        sa.Column("id", string(), nullable=False),
        sa.Column("tenant", string(), nullable=False),
        sa.Column("segment", string(), nullable=False),
        sa.Column("candidate", string(), nullable=False),
        sa.Column("incumbent", string(), nullable=True),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("status", string(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("snapshot", sa.JSON(), nullable=True),
        sa.Column("created_by", string(), nullable=False),
        sa.Column("ended_by", string(), nullable=True),
        sa.Column("started_at", when(), nullable=False),
        sa.Column("decided_at", when(), nullable=True),
        sa.Column("ended_at", when(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("experiment", schema=None) as batch_op:
        for column in ("tenant", "segment", "candidate", "status", "started_at"):
            batch_op.create_index(batch_op.f(f"ix_experiment_{column}"), [column], unique=False)
        batch_op.create_index(
            "uq_experiment_one_running",
            ["segment"],
            unique=True,
            sqlite_where=sa.text("status = 'running'"),
            postgresql_where=sa.text("status = 'running'"),
        )


def downgrade() -> None:
    op.drop_table("experiment")
