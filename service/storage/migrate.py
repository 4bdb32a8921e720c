"""Schema migrations (Alembic): the revisions in `service/storage/migrations/versions/` own the
schema.

At start-up (`init_db`, used by `prefloop serve`, `worker`, and the CLI) the database is brought
to this prefloop's revision when that is safe:

- a fresh database: every revision is applied;
- a database made before migrations existed (tables, no `alembic_version`) with every column the
  first revision has: it is stamped with that revision, then upgraded like any other;
- pending revisions that are all marked `additive = True` (they add, never drop or rewrite):
  applied;
- anything else (a revision that drops or rewrites, a database from a newer prefloop): start-up
  stops with a message; an operator backs up and runs `prefloop db upgrade`.

Every upgrade runs in one transaction under a lock (Postgres: an advisory lock; SQLite: the
write lock of BEGIN IMMEDIATE), so replicas starting together migrate once: the others wait,
then find the database at head.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine

SCRIPTS = Path(__file__).resolve().parent / "migrations"
INITIAL = "0001"
# pg_advisory_xact_lock key: any constant shared by every prefloop process ("pref" in ASCII).
LOCK_KEY = 0x70726566


class MigrationRequired(RuntimeError):
    """The database needs a migration that is not safe to apply unattended (or is newer)."""


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    cfg.attributes["connection"] = connection
    return cfg


def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    return scripts().get_current_head()


@contextmanager
def locked(engine: Engine) -> Iterator[Connection]:
    """One transaction that no other prefloop process can be migrating in at the same time."""
    with engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE (service.storage.db), the write lock
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        yield conn


def current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _models() -> None:
    # Import for the side effect: the tables register on SQLModel.metadata.
    import adapters.registry  # noqa: F401
    import service.storage.tables  # noqa: F401


def _adopt_legacy(conn: Connection) -> bool:
    """A database `create_all` made before migrations: stamp it with the first revision if it
    has every column that revision creates (later revisions then apply as usual). Returns
    whether it was one."""
    inspector = inspect(conn)
    if not inspector.has_table("conversation"):
        return False
    missing = [
        f"{table}.{column}"
        for table, columns in _initial_schema().items()
        for column in columns
        if not inspector.has_table(table)
        or column not in {c["name"] for c in inspector.get_columns(table)}
    ]
    if missing:
        raise MigrationRequired(
            f"the database was created by an older prefloop and lacks {', '.join(missing)}; "
            "move it aside (or point PREFLOOP_DATABASE_URL elsewhere) and start again"
        )
    command.stamp(alembic_config(conn), INITIAL)
    return True


def _initial_schema() -> dict[str, list[str]]:
    """The tables and columns the first revision creates (built in a scratch SQLite)."""
    scratch = create_engine("sqlite://")
    with scratch.begin() as conn:
        command.upgrade(alembic_config(conn), INITIAL)
        inspector = inspect(conn)
        schema = {
            t: [c["name"] for c in inspector.get_columns(t)]
            for t in inspector.get_table_names()
            if t != "alembic_version"
        }
    scratch.dispose()
    return schema


def pending(conn: Connection) -> list:
    """The revisions between the database's and head, oldest first."""
    cur = current(conn)
    script = scripts()
    if cur is not None:
        try:
            script.get_revision(cur)
        except Exception as exc:  # noqa: BLE001 - alembic raises several kinds here
            raise MigrationRequired(
                f"the database is at revision {cur}, which this prefloop does not know: a newer "
                "prefloop migrated it; run that version (or restore a backup)"
            ) from exc
    return list(reversed(list(script.iterate_revisions(script.get_current_head(), cur))))


def upgrade_at_startup(engine: Engine, *, auto: bool = True) -> list[str]:
    """Bring the database to head if that is safe (see the module docstring); returns the
    revisions applied."""
    with locked(engine) as conn:
        if current(conn) is None:
            _adopt_legacy(conn)
        todo = pending(conn)
        if not todo:
            return []
        fresh = current(conn) is None
        unsafe = [r.revision for r in todo if not getattr(r.module, "additive", False)]
        if not fresh and (unsafe or not auto):
            url = engine.url.render_as_string(hide_password=True)
            why = (
                f"revisions {', '.join(unsafe)} change existing data"
                if unsafe
                else "PREFLOOP_DB_AUTO_UPGRADE is off"
            )
            raise MigrationRequired(
                f"the database {url} is at revision {current(conn)}, this prefloop needs "
                f"{todo[-1].revision} and {why}: back it up, then run `prefloop db upgrade`"
            )
        command.upgrade(alembic_config(conn), "head")
        return [r.revision for r in todo]


def upgrade(engine: Engine, target: str = "head") -> tuple[str | None, str | None]:
    """`prefloop db upgrade`: apply every pending revision. Returns (before, after)."""
    with locked(engine) as conn:
        if current(conn) is None:
            _adopt_legacy(conn)
        before = current(conn)
        command.upgrade(alembic_config(conn), target)
        return before, current(conn)


def diff(engine: Engine) -> list:
    """What differs between the database and the models (empty: a migration covers them)."""
    from sqlmodel import SQLModel

    _models()
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, SQLModel.metadata)


def revision(engine: Engine, message: str) -> None:
    """`prefloop db revision -m ...` (for developers): autogenerate a revision from the models
    against a database at head."""
    with locked(engine) as conn:
        command.revision(alembic_config(conn), message=message, autogenerate=True)
