"""The database layer: GroupCommit (concurrent writes share one transaction, yet each succeeds
or fails alone, and none is answered before the commit), and the schema check at start-up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlmodel import Session, select

from service.core.config import Settings
from service.storage.db import GroupCommit, init_db, make_engine
from service.storage.tables import Conversation
from tests.conftest import BOTH_DATABASES


@pytest.fixture
def writer(tmp_path: Path, db_url: str):
    db = make_engine(Settings(home=tmp_path, database_url=db_url))
    init_db(db)
    w = GroupCommit(db)
    yield w
    w.close()
    db.dispose()


@BOTH_DATABASES
def test_concurrent_writes_commit_together_and_fail_alone(writer: GroupCommit) -> None:
    def add(i: int):
        def fn(session: Session) -> str:
            if i % 10 == 7:
                raise ValueError(f"write {i} is bad")
            session.add(Conversation(id=f"conv-{i}", user_id=f"u{i}"))
            session.flush()
            return f"conv-{i}"

        return fn

    commits = []
    event.listen(writer.engine, "commit", lambda conn: commits.append(1))

    async def scenario() -> list:
        writes = (writer.write(add(i)) for i in range(200))
        return await asyncio.gather(*writes, return_exceptions=True)

    results = asyncio.run(scenario())
    assert len(commits) < 50, f"{len(commits)} commits for 200 concurrent writes"
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 20 and all("is bad" in str(e) for e in errors)
    with Session(writer.engine) as session:
        stored = set(session.exec(select(Conversation.id)).all())
    assert stored == {r for r in results if isinstance(r, str)}
    assert len(stored) == 180


@BOTH_DATABASES
def test_a_clash_rolls_back_only_its_own_write(writer: GroupCommit) -> None:
    from sqlalchemy.exc import IntegrityError

    async def scenario() -> list:
        def first(session: Session) -> str:
            session.add(Conversation(id="conv-same"))
            session.flush()
            return "first"

        def clash(session: Session) -> str:
            session.add(Conversation(id="conv-same"))  # the same primary key
            session.flush()
            return "clash"

        def other(session: Session) -> str:
            session.add(Conversation(id="conv-other"))
            session.flush()
            return "other"

        return await asyncio.gather(
            writer.write(first), writer.write(clash), writer.write(other), return_exceptions=True
        )

    first, clash, other = asyncio.run(scenario())
    assert first == "first" and other == "other"
    assert isinstance(clash, IntegrityError)
    with Session(writer.engine) as session:
        assert set(session.exec(select(Conversation.id)).all()) == {"conv-same", "conv-other"}


def test_an_older_schema_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    import sqlite3

    from service.storage.migrate import MigrationRequired as SchemaMismatchError

    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE conversation (id VARCHAR PRIMARY KEY, created_at DATETIME)")
    con.commit()
    con.close()
    db = make_engine(Settings(home=tmp_path, database_url=f"sqlite:///{path}"))
    with pytest.raises(SchemaMismatchError, match="conversation.tenant.*move it aside"):
        init_db(db)
    db.dispose()
