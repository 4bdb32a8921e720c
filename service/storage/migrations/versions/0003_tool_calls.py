"""tool calls

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06

Issue 22's tools: the tools offered with each completion's prompt, each assistant message's tool
calls, and the call a tool message answers, so tool-using chats can be rated and compiled.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
additive: bool = True  # three nullable columns


def upgrade() -> None:
    with op.batch_alter_table("completion", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tools", sa.JSON(), nullable=True))
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tool_calls", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column("tool_call_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.drop_column("tool_call_id")
        batch_op.drop_column("tool_calls")
    with op.batch_alter_table("completion", schema=None) as batch_op:
        batch_op.drop_column("tools")
