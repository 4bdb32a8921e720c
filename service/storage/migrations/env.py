"""Alembic's entry point: migrations run on the connection `service.storage.migrate` hands in
(already inside its locked transaction), against the models' metadata."""

from alembic import context
from sqlmodel import SQLModel

import adapters.registry  # noqa: F401 - registers the registry's tables
import service.storage.tables  # noqa: F401 - registers the service's tables

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    # SQLite alters tables by copying them; batch mode writes migrations that do so.
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
