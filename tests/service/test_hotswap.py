"""Hot-swap under load: a replica in its own process follows promotions and rollbacks made by
other processes (and through its own operator API), with zero failed requests, and every stored
completion names the adapter version that really produced it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from adapters.registry import APPROVED, Registry
from service.core.config import Settings
from service.storage.db import init_db, make_engine
from tests.conftest import make_adapter
from tests.servers import serve_subprocess

# Promotions under load, through real HTTP.
pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Tell me something."}]
GREEDY = {"messages": PROMPT, "max_tokens": 6, "temperature": 0}


def ask(http: httpx.Client, stream: bool) -> tuple[str, str | None, str]:
    """(text, adapter_version, completion id) of one greedy answer, streamed or not."""
    if not stream:
        r = http.post("/v1/chat/completions", json=GREEDY)
        r.raise_for_status()
        body = r.json()
        return body["choices"][0]["message"]["content"], body["adapter_version"], body["id"]
    text, version, cid = [], None, None
    with http.stream("POST", "/v1/chat/completions", json={**GREEDY, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            cid = chunk["id"]
            if "adapter_version" in chunk:
                version = chunk["adapter_version"]
            text += [c["delta"].get("content") or "" for c in chunk["choices"]]
    return "".join(text), version, cid


def wait_served(http: httpx.Client, version: str | None, timeout: float = 10) -> float:
    """Seconds until a new request is answered by `version`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if ask(http, False)[1] == version:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{version} not served after {timeout}s")


@pytest.fixture
def replica(tiny_llama_dir: Path, tmp_path: Path, db_url: str):
    env = {
        "PREFLOOP_HOME": str(tmp_path),
        "PREFLOOP_MODEL": str(tiny_llama_dir),
        "PREFLOOP_ADAPTER_POLL_SECONDS": "0.2",
        "PREFLOOP_WATCH_INTERVAL_SECONDS": "0",
        "PREFLOOP_MAX_QUEUE": "64",
    }
    # The test process is "another process": it registers and promotes through the database.
    db = make_engine(Settings(database_url=db_url))
    init_db(db)
    registry = Registry(db, tmp_path / "adapters")
    with serve_subprocess({**env, "PREFLOOP_DATABASE_URL": db_url}, tmp_path) as server:
        yield server, registry
    db.dispose()


def test_promotions_and_rollbacks_under_load_fail_no_request(
    replica, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    server, registry = replica
    ids = []
    for i in range(3):
        src = make_adapter(tiny_llama_dir, tmp_path / "trained" / f"a{i}", seed=100 + i)
        row = registry.register(src, actor="test")
        registry.transition(row.id, APPROVED, actor="test")
        ids.append(row.id)

    http = httpx.Client(base_url=server.base_url, timeout=60)
    # What each version answers, alone (greedy, so it is a fingerprint of the weights).
    expected = {None: ask(http, False)[0]}
    for vid in ids:
        registry.promote(vid, actor="test")
        wait_served(http, vid)
        expected[vid] = ask(http, False)[0]
    assert len(set(expected.values())) == 4, expected

    failures: list[str] = []
    served: list[tuple[str, str | None, str]] = []
    stop = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(base_url=server.base_url, timeout=60) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    served.append(ask(c, stream=(i + k) % 2 == 0))
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    try:
        swap_ten_times(server.base_url, registry, ids, http)
    finally:  # a failed swap must not leave the clients running
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert len(served) > 40
    # Every answer matches the version it says produced it, and that is what was stored.
    for text, version, _cid in served:
        assert text == expected[version], (version, text)
    from sqlmodel import Session, select

    from service.storage.tables import Completion, Message

    with Session(registry.db) as s:
        rows = s.exec(
            select(
                Completion.id, Completion.adapter_version, Completion.status, Message.content
            ).join(Message, Message.completion_id == Completion.id)
        ).all()
    stored = {cid: (version, status, content) for cid, version, status, content in rows}
    for text, version, cid in served:
        assert stored[cid] == (version, "succeeded", text)
    assert {v for _t, v, _c in served} >= set(ids)  # every version served during the storm

    # Replaced versions are unloaded once idle: only the active one stays in memory.
    active = registry.active().get("default")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        names = [m["id"] for m in http.get("/v1/models").json()["data"]]
        if [n for n in names if "@" in n] == ([active.id] if active else []):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"old versions still loaded: {names}")


def swap_ten_times(base_url: str, registry: Registry, ids: list[str], http: httpx.Client) -> None:
    # 10 consecutive swaps, alternating the operator API of the replica and the database
    # (another process), promotions and rollbacks.
    ops = [  # (via, op, version promoted; rollbacks go to the replaced version)
        ("api", "promote", ids[0]),
        ("db", "promote", ids[1]),
        ("api", "rollback", None),  # -> ids[0]
        ("db", "promote", ids[2]),
        ("db", "rollback", None),  # -> ids[0]
        ("api", "promote", ids[1]),
        ("api", "rollback", None),  # -> ids[0]
        ("db", "rollback", None),  # -> ids[2], which ids[0] replaced
        ("api", "promote", ids[1]),
        ("db", "rollback", None),  # -> ids[2]
    ]
    ops_http = httpx.Client(base_url=base_url, timeout=60, headers={"X-Operator": "t"})
    for via, op, vid in ops:
        if op == "promote":
            if via == "api":
                r = ops_http.post(f"/v1/operator/adapters/{vid}/promote")
                assert r.status_code == 200, r.text
            else:
                registry.promote(vid, actor="other-process")
        elif via == "api":
            r = ops_http.post("/v1/operator/adapters/rollback", json={"reason": "test"})
            assert r.status_code == 200, r.text
        else:
            registry.rollback(actor="other-process", reason="test")
        now = registry.active().get("default")
        wait_served(http, now.id if now else None)
        time.sleep(0.3)  # requests in flight across the swap
