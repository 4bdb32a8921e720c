"""Several processes on one database, as in production: two `prefloop serve` replicas taking
feedback at once on Postgres (no write lost, none doubled, retries answered with the same row),
and workers racing for the refresh lease (exactly one wins each time), on Postgres and SQLite."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, update
from sqlmodel import Session, select

from service.storage.tables import Feedback, Lease, utcnow
from tests.conftest import BOTH_DATABASES
from tests.servers import serve_subprocess

USERS, ANSWERS = 6, 8


def _replica_env(tiny_llama_dir: Path, db_url: str, home: Path) -> dict[str, str]:
    return {
        "PREFLOOP_MODEL": str(tiny_llama_dir),
        "PREFLOOP_DATABASE_URL": db_url,
        "PREFLOOP_HOME": str(home),
        "PREFLOOP_REFRESH_ENABLED": "false",
        "PREFLOOP_WATCH_INTERVAL_SECONDS": "0",
        "PREFLOOP_ACCESS_LOG": "false",
        "PREFLOOP_TORCH_THREADS": "1",
    }


# Postgres only: SQLite's cross-process case is covered by the feedback tests' concurrent votes,
# and this test costs two replica start-ups.
@pytest.mark.slow  # two server processes
@pytest.mark.postgres
@pytest.mark.parametrize("db_backend", ["postgres"], indirect=True)
def test_two_replicas_take_feedback_at_once(
    tiny_llama_dir: Path, db_url: str, tmp_path: Path
) -> None:
    env = _replica_env(tiny_llama_dir, db_url, tmp_path)
    with ExitStack() as stack:
        # Both start at once on an empty database: they migrate it once between them.
        servers: list = [None, None]

        def start(i: int) -> None:
            servers[i] = stack.enter_context(serve_subprocess(env, tmp_path))

        starters = [threading.Thread(target=start, args=(i,)) for i in range(2)]
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        a, b = servers
        assert a is not None and b is not None, "a replica did not start"
        with httpx.Client(base_url=a.base_url, timeout=60) as http:
            completions = [
                http.post(
                    "/v1/chat/completions",
                    json={
                        "messages": [{"role": "user", "content": f"question {i}"}],
                        "max_tokens": 3,
                    },
                ).json()["id"]
                for i in range(ANSWERS)
            ]

        # Every user rates every answer once, through one replica, while the same request is
        # retried (same Idempotency-Key) through the other; and one slot gets opposite votes
        # from both replicas at the same moment.
        def send(job: tuple[str, str, dict]) -> httpx.Response:
            base, key, body = job
            return httpx.post(
                f"{base}/v1/feedback", json=body, headers={"Idempotency-Key": key}, timeout=60
            )

        jobs = []
        for u in range(USERS):
            for c, cid in enumerate(completions):
                body = {"completion_id": cid, "rating": 1 if (u + c) % 2 else -1, "user": f"u{u}"}
                first, retry = (a, b) if (u + c) % 2 else (b, a)
                jobs += [(first.base_url, f"k-{u}-{c}", body), (retry.base_url, f"k-{u}-{c}", body)]
        race = {"completion_id": completions[0], "user": "racer"}
        jobs += [(a.base_url, "race-up", race | {"rating": 1})]
        jobs += [(b.base_url, "race-down", race | {"rating": -1})]
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send, jobs))

    assert [r.status_code for r in answers] == [201] * len(jobs), [
        r.text for r in answers if r.status_code != 201
    ][:3]
    by_key: dict[str, set[str]] = {}
    for (_, key, _), r in zip(jobs, answers, strict=True):
        by_key.setdefault(key, set()).add(r.json()["id"])
    assert all(len(ids) == 1 for ids in by_key.values()), "a retry got another row"
    # Usually one of each pair is answered as a replay. On Postgres both may be answered as
    # writes: when neither replica's transaction had committed as the other looked the key up,
    # the second one's upsert waits for the first and updates the same row to the same values.
    replayed = sum(r.headers.get("Idempotent-Replayed") == "true" for r in answers)
    assert replayed <= USERS * ANSWERS

    db = create_engine(db_url)
    with Session(db) as s:
        rows = s.exec(select(Feedback)).all()
    db.dispose()
    assert len(rows) == USERS * ANSWERS + 1, "one row per (user, answer) and one for the racer"
    assert len({(r.user_id, r.target) for r in rows}) == len(rows)
    for r in rows:
        if r.user_id != "racer":
            u, c = (int(x) for x in r.idempotency_key.split("-")[1:])
            assert r.value == (1 if (u + c) % 2 else -1)
    [racer] = [r for r in rows if r.user_id == "racer"]
    assert (racer.value, racer.idempotency_key) in {(1, "race-up"), (-1, "race-down")}


ROUNDS = 12


def _lease_racer(db_url: str, me: int, barrier, results) -> None:  # noqa: ANN001
    from service.core.config import Settings
    from service.loop.lease import acquire_lease
    from service.storage.db import make_engine

    db = make_engine(Settings(database_url=db_url))
    for round_ in range(ROUNDS):
        barrier.wait()
        results.put((round_, me, acquire_lease(db, f"worker-{me}", ttl=60)))
        barrier.wait()
        if me == 0:  # the winner "crashes": its lease expires before the next round
            with Session(db) as s:
                s.exec(update(Lease).values(expires_at=utcnow()))
                s.commit()
        barrier.wait()
    db.dispose()


@BOTH_DATABASES
def test_workers_racing_for_the_lease_exactly_one_wins(db_url: str) -> None:
    from service.core.config import Settings
    from service.storage.db import init_db, make_engine

    db = make_engine(Settings(database_url=db_url))
    init_db(db)
    db.dispose()
    # fork: the racers need nothing but SQLAlchemy; they open their own connections.
    ctx = multiprocessing.get_context("fork")
    workers = 3
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [
        ctx.Process(target=_lease_racer, args=(db_url, i, barrier, results)) for i in range(workers)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in range(ROUNDS * workers)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for r in range(ROUNDS):
        this_round = [(me, held_by) for round_, me, held_by in outcomes if round_ == r]
        assert len(this_round) == workers
        winners = [me for me, held_by in this_round if held_by is None]
        assert len(winners) == 1, f"round {r}: {this_round}"
    # The first round raced on inserting the row, the others on taking an expired one.
    db = create_engine(db_url)
    with Session(db) as s:
        assert s.exec(select(func.count()).select_from(Lease)).one() == 1
    db.dispose()
