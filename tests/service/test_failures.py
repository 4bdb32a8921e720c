"""Failures are stored, never lost: engine errors, disconnects and a full queue, through real HTTP
(uvicorn in a thread) against the embedded engine on a tiny random Llama."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine
from sqlmodel import Session, select

from service.core.config import Settings
from service.engines.local import LocalEngine
from service.main import create_app
from service.storage.tables import Completion, Message
from tests.servers import serve_thread

HELLO = [{"role": "user", "content": "Hello!"}]
# Greedy, the tiny random model repeats one token and never stops: long answers on demand.


@pytest.fixture
def live(
    tiny_llama_dir: Path, tmp_path: Path, db_url: str
) -> Iterator[tuple[str, LocalEngine, Session]]:
    settings = Settings(home=tmp_path, model=str(tiny_llama_dir), database_url=db_url)
    engine = LocalEngine(str(tiny_llama_dir), model_name="tiny", max_queue=1)
    asyncio.run(engine.start())
    try:
        with serve_thread(create_app(settings, engine=engine)) as base_url:
            db = create_engine(settings.db_url)
            with Session(db) as session:
                yield base_url, engine, session
            db.dispose()
    finally:
        asyncio.run(engine.aclose())


def break_model_after(engine: LocalEngine, calls: int) -> None:
    """Fault injection: the model's forward raises after `calls` successful calls."""
    real = engine.model.forward
    count = {"n": 0}

    def failing(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    engine.model.forward = failing


def test_engine_failure_is_stored_and_reported(live) -> None:
    base_url, engine, db = live
    break_model_after(engine, 3)
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"messages": HELLO, "max_tokens": 20, "temperature": 0},
        timeout=30,
    )
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "engine_error" and "out of memory" in err["message"]
    (failed,) = db.exec(select(Completion)).all()
    assert failed.status == "failed" and "out of memory" in failed.error
    assert failed.finished_at is not None
    # The prompt is kept: the user's message is stored even though the answer failed.
    assert [m.role for m in db.exec(select(Message)).all()] == ["user"]


def test_stream_failure_is_stored_then_sent_as_an_error_event(live) -> None:
    base_url, engine, db = live
    break_model_after(engine, 3)
    body = {"messages": HELLO, "max_tokens": 20, "temperature": 1.0, "seed": 1, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "out of memory" in error["message"]
    (failed,) = db.exec(select(Completion)).all()
    assert failed.status == "failed" and "out of memory" in failed.error


def test_client_disconnect_mid_stream_is_stored_as_cancelled(live) -> None:
    base_url, _engine, db = live
    body = {"messages": HELLO, "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=30) as r:
        for i, _line in enumerate(r.iter_lines()):
            if i > 6:
                break  # hang up mid-answer
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        db.expire_all()
        rows = db.exec(select(Completion)).all()
        if rows and rows[0].status != "running":
            break
        time.sleep(0.1)
    (c,) = rows
    assert c.status == "cancelled" and c.error == "the client disconnected"
    (answer,) = db.exec(select(Message).where(Message.completion_id == c.id)).all()
    assert 0 < answer.completion_tokens < 1000


def slow_down(engine: LocalEngine, seconds: float) -> None:
    """Each forward pass takes at least `seconds`: a long generation on a tiny model."""
    real = engine.model.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    engine.model.forward = slow


def test_full_queue_answers_503_with_retry_after(live) -> None:
    base_url, engine, db = live
    slow_down(engine, 0.01)
    body = {"messages": HELLO, "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # kept: a discarded iterator closes the connection
        next(lines)  # the first request holds the only slot
        second = httpx.post(
            f"{base_url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5}
        )
    assert second.status_code == 503, second.text
    assert second.headers["retry-after"] == "2"
    assert second.json()["error"]["code"] == "overloaded"
    failed = db.exec(select(Completion).where(Completion.status == "failed")).all()
    assert len(failed) == 1 and "queue is full" in failed[0].error
