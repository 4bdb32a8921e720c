"""Alembic owns the schema: migrating an empty database gives exactly the models' tables (a model
change without a migration fails here), on SQLite and Postgres; start-up applies only what is
safe; replicas starting together migrate once; `prefloop db ...` reports and upgrades."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from service.core.config import Settings
from service.storage import migrate as migrations
from service.storage.db import init_db, make_engine
from tests.conftest import BOTH_DATABASES


@BOTH_DATABASES
def test_the_migrated_schema_is_the_models(db_url: str) -> None:
    db = make_engine(Settings(database_url=db_url))
    init_db(db)
    with db.connect() as conn:
        assert migrations.current(conn) == migrations.head()
    # compare_metadata: tables, columns, types, nullability, indexes, unique constraints.
    assert migrations.diff(db) == [], "the models changed: write a migration (prefloop db revision)"
    indexes = {i["name"]: i for i in inspect(db).get_indexes("adapterversion")}
    assert indexes["uq_adapter_one_active"]["unique"]
    init_db(db)  # at head: nothing to do
    db.dispose()


@BOTH_DATABASES
def test_only_additive_migrations_run_at_start_up(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = make_engine(Settings(database_url=db_url))
    init_db(db)
    scripts = tmp_path / "migrations"
    shutil.copytree(migrations.SCRIPTS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(migrations, "SCRIPTS", scripts)

    def add_revision(rev: str, down: str, additive: bool, column: str) -> None:
        (scripts / "versions" / f"{rev}_test.py").write_text(
            f'"""test: add conversation.{column}"""\n'
            "import sqlalchemy as sa\nfrom alembic import op\n\n"
            f"revision = {rev!r}\ndown_revision = {down!r}\nbranch_labels = None\n"
            f"depends_on = None\nadditive = {additive}\n\n\n"
            "def upgrade():\n"
            "    with op.batch_alter_table('conversation') as b:\n"
            f"        b.add_column(sa.Column({column!r}, sa.String(), nullable=True))\n"
        )

    # Test revisions go on top of the real head, whatever later issues add.
    add_revision("t001", migrations.head(), True, "extra_a")
    with pytest.raises(migrations.MigrationRequired, match="PREFLOOP_DB_AUTO_UPGRADE is off"):
        init_db(db, auto_upgrade=False)
    assert migrations.upgrade_at_startup(db) == ["t001"]
    add_revision("t002", "t001", False, "extra_b")
    with pytest.raises(migrations.MigrationRequired, match=r"t002 change.*prefloop db upgrade"):
        init_db(db)
    assert migrations.upgrade(db) == ("t001", "t002")
    columns = {c["name"] for c in inspect(db).get_columns("conversation")}
    assert {"extra_a", "extra_b"} <= columns
    db.dispose()


@BOTH_DATABASES
def test_a_database_from_before_migrations_is_adopted(db_url: str) -> None:
    import adapters.registry  # noqa: F401
    import service.storage.tables  # noqa: F401

    db = make_engine(Settings(database_url=db_url))
    # What init_db's create_all made before migrations began: the first revision's schema, with
    # no alembic_version table. Later revisions (keys, ...) then add the rest.
    migrations.upgrade(db, migrations.INITIAL)
    with db.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
    init_db(db)
    with db.connect() as conn:
        assert migrations.current(conn) == migrations.head()
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    db.dispose()


@BOTH_DATABASES
def test_replicas_starting_together_migrate_once(db_url: str, tmp_path: Path) -> None:
    code = (
        "from service.core.config import Settings\n"
        "from service.storage.db import init_db, make_engine\n"
        "init_db(make_engine(Settings()))\n"
    )
    env = {**os.environ, "PREFLOOP_DATABASE_URL": db_url, "PREFLOOP_HOME": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    db = make_engine(Settings(database_url=db_url))
    with db.connect() as conn:
        assert migrations.current(conn) == migrations.head()
    assert migrations.diff(db) == []
    db.dispose()


def test_db_commands(db_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "PREFLOOP_DATABASE_URL": db_url, "PREFLOOP_HOME": str(tmp_path)}

    def prefloop(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "service", "db", *args], env=env, capture_output=True, text=True
        )

    out = prefloop("current")
    assert out.returncode == 0 and "empty (no migrations applied)" in out.stdout, out.stderr
    assert f"pending {migrations.INITIAL}" in out.stdout
    out = prefloop("upgrade")
    assert out.returncode == 0 and f"empty -> {migrations.head()}" in out.stdout, out.stderr
    out = prefloop("check")
    assert out.returncode == 0 and "the schema matches the models" in out.stdout, out.stderr
    assert "initial schema" in prefloop("history").stdout
