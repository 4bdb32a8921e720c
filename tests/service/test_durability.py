"""Durability under crashes, with real processes: a server SIGKILLed during a burst of feedback
writes loses none it acknowledged; a database that goes away gives 503s and the service
recovers when it returns (a real Postgres database); a training subprocess killed or running
past its limit fails the refresh and leaves the active adapter serving."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlmodel import col, update

from service.core.config import Settings
from service.loop.lease import LEASE
from service.main import create_app
from service.storage.tables import Lease, utcnow
from tests.conftest import make_adapter
from tests.servers import free_port, serve_thread, wait_ready
from tests.service.conftest import Live
from tests.service.test_refresh import FAST, OPS, picks, wait_run

# Server and trainer processes killed and restarted.
pytestmark = pytest.mark.slow

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def start_server(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(port)],
            env={**os.environ, **env},
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, timeout=180, proc=proc)
    except Exception as exc:
        proc.kill()
        raise RuntimeError(f"{exc}\n{log.read_text()}") from exc
    return proc, base_url


def test_sigkill_during_a_feedback_burst_loses_no_acknowledged_write(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    db_path = tmp_path / "crash.db"
    env = {
        "PREFLOOP_HOME": str(tmp_path),
        "PREFLOOP_MODEL": str(tiny_llama_dir),
        "PREFLOOP_DATABASE_URL": f"sqlite:///{db_path}",
        "PREFLOOP_REFRESH_ENABLED": "false",
        "PREFLOOP_WATCH_INTERVAL_SECONDS": "0",
        "PREFLOOP_ACCESS_LOG": "false",
    }
    proc, base_url = start_server(env, tmp_path / "server.log")
    completions = []
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for i in range(4):
            r = http.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 2},
            )
            assert r.status_code == 200, r.text
            completions.append(r.json()["id"])

    acked: list[tuple[str, str]] = []  # (feedback id, user) answered 201
    unanswered = [0]  # sent, but the server died before answering: may or may not be stored
    lock, stop = threading.Lock(), threading.Event()

    def writer(t: int) -> None:
        with httpx.Client(base_url=base_url, timeout=10) as http:
            i = 0
            while not stop.is_set():
                user = f"w{t}-{i}"
                try:
                    r = http.post(
                        "/v1/feedback",
                        json={"completion_id": completions[i % 4], "rating": 1, "user": user},
                        headers={"Idempotency-Key": uuid.uuid4().hex},
                    )
                except httpx.HTTPError:
                    with lock:
                        unanswered[0] += 1
                    return  # the server is gone
                assert r.status_code == 201, r.text
                with lock:
                    acked.append((r.json()["id"], user))
                i += 1

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 400 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-burst: writers are waiting on a group commit
    proc.wait()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acked) >= 400

    # Restart on the same database: every acknowledged write is there, and the file is sound.
    proc, base_url = start_server(env, tmp_path / "server.log")
    try:
        with sqlite3.connect(db_path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            stored = dict(conn.execute("SELECT id, user_id FROM feedback").fetchall())
        lost = [fid for fid, user in acked if stored.get(fid) != user]
        print(
            f"\ncrash test: {len(acked)} writes acknowledged before SIGKILL, "
            f"{unanswered[0]} in flight, {len(stored)} stored, lost {len(lost)}"
        )
        assert lost == []
        r = httpx.post(
            f"{base_url}/v1/feedback", json={"completion_id": completions[0], "rating": -1}
        )
        assert r.status_code == 201, r.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def pg_scratch_database() -> Iterator[tuple[str, object]]:
    """A fresh database on the shared Postgres server (never the server itself is stopped)."""
    try:
        admin = create_engine(PG_SERVER, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no Postgres on 127.0.0.1:5432 ({type(exc).__name__})")
    name = f"prefloop_t8_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", (admin, name)
    finally:
        with admin.connect() as c:
            c.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_live(
    pg_scratch_database: tuple[str, object],
    tiny_engine: object,
    tiny_llama_dir: Path,
    tmp_path: Path,
) -> Iterator[Live]:
    url = pg_scratch_database[0]
    settings = Settings(
        home=tmp_path, model=str(tiny_llama_dir), database_url=url, refresh_enabled=False
    )
    with serve_thread(create_app(settings, engine=tiny_engine)) as base_url:  # type: ignore[arg-type]
        with httpx.Client(base_url=base_url, timeout=30) as http:
            yield Live(base_url=base_url, db_url=url, http=http, model_dir=tiny_llama_dir)


def test_database_unavailable_is_a_503_and_the_service_recovers(
    pg_scratch_database: tuple[str, object], pg_live: Live
) -> None:
    live = pg_live
    _url, (admin, name) = pg_scratch_database
    assert live.http.get("/readyz").status_code == 200
    answer = live.chat([{"role": "user", "content": "hello"}], n=2)
    assert live.feedback(completion_id=answer["id"], rating=1).status_code == 201

    with admin.connect() as c:  # type: ignore[attr-defined]
        c.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        c.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
            {"n": name},
        )
    for r in (
        live.feedback(completion_id=answer["id"], rating=-1, user="u2"),
        live.http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        ),
        live.http.get("/v1/operator/pairs"),
        live.http.get("/readyz"),
    ):
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"]
        assert "database is unavailable" in r.json()["error"]["message"]

    with admin.connect() as c:  # type: ignore[attr-defined]
        c.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
    r = live.feedback(completion_id=answer["id"], rating=-1, user="u2")
    assert r.status_code == 201, r.text
    assert live.http.get("/readyz").status_code == 200
    assert live.chat([{"role": "user", "content": "back"}])["choices"]


def _training_children() -> list[int]:
    """Our `python -m trainer train` subprocesses (the live app runs in this process)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and cmd[1:4] == [b"-m", b"trainer", b"train"]:
            found.append(int(pid))
    return found


@pytest.mark.parametrize(
    "settings_overrides",
    [
        {
            **FAST,
            # 500 epochs (1000 steps of the tiny model) finished inside 24 s on CI's machine;
            # 100000 cannot, on any machine.
            "refresh_train": {**FAST["refresh_train"], "epochs": 100_000},
            "refresh_train_timeout_minutes": 0.4,  # 24 s
        }
    ],
)
def test_a_killed_or_overdue_training_fails_the_run_and_serving_goes_on(
    live: Live, tmp_path: Path
) -> None:
    assert live.model_dir is not None
    path = make_adapter(live.model_dir, tmp_path / "v1", seed=1)
    vid = live.http.post("/v1/operator/adapters", json={"path": str(path)}, headers=OPS).json()[
        "id"
    ]
    live.http.post(f"/v1/operator/adapters/{vid}/approve", headers=OPS).raise_for_status()
    live.http.post(f"/v1/operator/adapters/{vid}/promote", headers=OPS).raise_for_status()
    picks(live, 8)

    # 1. Killed (as the OOM killer would): the run fails and says so.
    run_id = live.http.post("/v1/operator/runs", headers=OPS).json()["id"]
    deadline = time.monotonic() + 120
    while not (children := _training_children()):
        assert time.monotonic() < deadline, "no training subprocess started"
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(children[0], signal.SIGKILL)
    run = wait_run(live, run_id, timeout=60)
    assert (run["status"], run["stage"]) == ("failed", "train"), run
    assert "killed by signal 9" in run["error"]
    assert run["candidate_version"] is None

    # 2. Running past its limit: stopped, failed.
    run_id = live.http.post("/v1/operator/runs", headers=OPS).json()["id"]
    run = wait_run(live, run_id, timeout=120)
    assert (run["status"], run["stage"]) == ("failed", "train"), run
    assert "ran past its 24 s limit" in run["error"]
    assert _training_children() == []

    # The active adapter never changed, and it still answers.
    listing = live.http.get("/v1/operator/adapters", headers=OPS).json()
    assert [(a["id"], a["status"]) for a in listing["data"]] == [(vid, "active")]
    assert listing["serving"] == {"default": vid}
    assert live.chat([{"role": "user", "content": "still there?"}])["adapter_version"] == vid


@pytest.mark.parametrize(
    "settings_overrides",
    [
        {
            **FAST,
            "refresh_train": {**FAST["refresh_train"], "epochs": 100_000},
            "refresh_lease_seconds": 3.0,  # renewed every second
        }
    ],
)
def test_a_refresh_that_loses_its_lease_stops_and_changes_nothing(live: Live) -> None:
    """Fencing: when another process holds the lease (this one's renewals failed long enough
    for it to expire and be taken), the run stops its training at once and registers and
    promotes nothing."""
    picks(live, 8)
    run_id = live.http.post("/v1/operator/runs", headers=OPS).json()["id"]
    deadline = time.monotonic() + 120
    while not _training_children():
        assert time.monotonic() < deadline, "no training subprocess started"
        time.sleep(0.1)
    with live.session() as s:  # what a second worker does once the lease has expired
        s.exec(
            update(Lease)
            .where(col(Lease.name) == LEASE)
            .values(holder="worker-2:99", expires_at=utcnow() + timedelta(hours=1))
        )
        s.commit()
    run = wait_run(live, run_id, timeout=60)
    assert (run["status"], run["stage"]) == ("failed", "train"), run
    assert "lost its lease" in run["error"] and run["candidate_version"] is None
    assert _training_children() == []
    assert live.http.get("/v1/operator/adapters", headers=OPS).json()["data"] == []
    with live.session() as s:  # the lease is the other worker's still
        assert s.get(Lease, LEASE).holder == "worker-2:99"
