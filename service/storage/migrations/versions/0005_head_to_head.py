"""head-to-head

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Issue 23's head-to-head votes: a widget "which is better?" turn may be answered once by each arm
of a live canary, so each assistant message records the adapter version that wrote it, and the
completion the experiment it is a duel of.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
additive: bool = True  # two nullable columns and an index


def upgrade() -> None:
    string = sqlmodel.sql.sqltypes.AutoString
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.add_column(sa.Column("adapter_version", string(), nullable=True))
    with op.batch_alter_table("completion", schema=None) as batch_op:
        batch_op.add_column(sa.Column("experiment_id", string(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_completion_experiment_id"), ["experiment_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("completion", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_completion_experiment_id"))
        batch_op.drop_column("experiment_id")
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.drop_column("adapter_version")
