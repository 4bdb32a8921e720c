"""Live canaries (issue 23) on real parts: the Experiment table on SQLite and Postgres, the sticky
split through real HTTP on a tiny Llama with real LoRA adapters, the decision loop promoting and
rolling back on thumbs given through the feedback API, the fence on the incumbent, one claim
fleet-wide, a restarted app continuing the experiment, tenancy and the 4xx answers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from adapters.canary import assign
from adapters.registry import APPROVED, Registry
from service.auth import create_key
from service.core.config import Settings
from service.core.errors import ConflictError
from service.loop import live_watch
from service.main import create_app
from service.storage.db import init_db, make_engine
from service.storage.tables import Experiment, OperatorAction
from tests.conftest import BOTH_DATABASES
from tests.servers import serve_thread
from tests.service.conftest import Live, approved
from tests.service.test_refresh import FAST, picks, wait_run

OPS = {"X-Operator": "olga"}
HELLO = [{"role": "user", "content": "Help me, please."}]


@BOTH_DATABASES
def test_one_running_experiment_per_segment(db_url: str) -> None:
    db = make_engine(Settings(database_url=db_url))
    init_db(db)

    def add(segment: str, status: str = "running") -> str:
        exp = Experiment(segment=segment, candidate=f"{segment}@v2", share=0.1, status=status)
        with Session(db, expire_on_commit=False) as s:
            s.add(exp)
            s.commit()
        return exp.id

    first = add("default")
    add("other")  # another segment: fine
    add("default", status="stopped")  # ended ones do not count
    with pytest.raises(IntegrityError):
        add("default")
    with Session(db) as s:
        row = s.get(Experiment, first)
        row.status = "promoted"
        s.add(row)
        s.commit()
    add("default")  # the first ended: a new one may run
    assert [e.segment for e in live_watch.running(db)] == ["default", "other"]
    db.dispose()


# --- through the service, on a tiny model -------------------------------------------------------


def start(live: Live, candidate: str, headers: dict[str, str] = OPS, **body: Any) -> httpx.Response:
    return live.http.post(
        "/v1/operator/experiments", json={"candidate": candidate, **body}, headers=headers
    )


def served(live: Live, user: str, **body: Any) -> str | None:
    return live.chat(HELLO, user=user, **body)["adapter_version"]


def wait_until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def experiment(live: Live, exp_id: str) -> dict[str, Any]:
    r = live.http.get(f"/v1/operator/experiments/{exp_id}", headers=OPS)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_the_split_is_sticky_per_user_and_follows_the_share(
    live: Live, registry: Registry, lora: list[Path]
) -> None:
    v1, v2 = approved(registry, lora[0]), approved(registry, lora[1])
    registry.promote(v1, actor="test")
    wait_until(lambda: served(live, "anyone") == v1)
    r = start(live, v2, share=0.3, expect_incumbent=v1)
    assert r.status_code == 201, r.text
    exp = r.json()
    assert (exp["status"], exp["incumbent"], exp["share"]) == ("running", v1, 0.3)
    users = [f"user-{i}" for i in range(40)]
    expected = {u: v2 if assign(exp["id"], u, 0.3) else v1 for u in users}
    assert 4 <= sum(v == v2 for v in expected.values()) <= 20  # about 30% of 40
    probe = next(f"probe-{i}" for i in range(100) if assign(exp["id"], f"probe-{i}", 0.3))
    probes: list[str | None] = []
    wait_until(lambda: probes.append(served(live, probe)) or probes[-1] == v2)
    for user in users:  # each user sees one arm, every time
        assert served(live, user) == expected[user] == served(live, user)
    someone_on_v2 = next(u for u in users if expected[u] == v2)
    # A version named explicitly is served as named, whatever the split says.
    assert served(live, someone_on_v2, model=v1) == v1
    assert served(live, users[0], model=v2) == v2
    models = [m["id"] for m in live.http.get("/v1/models").json()["data"]]
    assert v2 in models  # the candidate is loaded beside the incumbent

    detail = experiment(live, exp["id"])
    arms = {a["arm"]: a for a in detail["arms"]}
    # Pinned requests do not count; each user asked twice above.
    n_v2 = 2 * sum(v == v2 for v in expected.values()) + probes.count(v2)
    assert arms["candidate"]["answers"] == n_v2
    assert arms["incumbent"]["version"] == v1 and detail["decision"]["action"] == "continue"

    r = live.http.post(f"/v1/operator/experiments/{exp['id']}/stop", headers=OPS)
    assert r.status_code == 200 and r.json()["status"] == "stopped", r.text
    wait_until(lambda: v2 not in [m["id"] for m in live.http.get("/v1/models").json()["data"]])
    assert served(live, someone_on_v2) == v1
    assert registry.get(v2).status == APPROVED  # stopping decides nothing
    with Session(registry.db) as s:
        audit = s.exec(
            select(OperatorAction).where(OperatorAction.action.startswith("canary"))
        ).all()
    assert [(a.action, a.actor) for a in audit] == [
        ("canary.start", "olga"),
        ("canary.stop", "olga"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings_overrides",
    [{"watch_interval_seconds": 0.2, "canary": {"min_outcomes": 12, "alpha": 0.05}}],
)
@pytest.mark.parametrize("better", [True, False], ids=["promotes", "rolls-back"])
def test_the_decision_loop_acts_on_live_feedback(
    live: Live, registry: Registry, lora: list[Path], better: bool
) -> None:
    candidate = approved(registry, lora[0])  # against the base model (no active version)
    r = start(live, candidate, share=0.5)
    assert r.status_code == 201 and r.json()["incumbent"] is None, r.text
    exp_id = r.json()["id"]
    wait_until(lambda: candidate in [m["id"] for m in live.http.get("/v1/models").json()["data"]])
    for i in range(200):  # users like one arm and not the other, until the loop decides
        if experiment(live, exp_id)["status"] != "running":
            break
        answer = live.chat(HELLO, user=f"voter-{i}")
        liked = (answer["adapter_version"] == candidate) == better
        r = live.feedback(completion_id=answer["id"], rating=1 if liked else -1)
        assert r.status_code == 201, r.text
    wait_until(lambda: experiment(live, exp_id)["status"] != "running")
    detail = experiment(live, exp_id)
    assert detail["status"] == ("promoted" if better else "rolled_back"), detail
    assert detail["ended_by"] == "canary"
    assert detail["snapshot"]["action"] == ("promote" if better else "rollback")
    lo, hi = detail["snapshot"]["interval"]
    assert (lo > 0) if better else (hi < 0)
    assert registry.get(candidate).status == ("active" if better else "rejected")
    wait_until(lambda: served(live, "anyone") == (candidate if better else None))
    events = registry.events(candidate)
    assert events[0].actor == "canary" and events[0].reason.startswith(f"canary {exp_id}")


@pytest.mark.slow
def test_a_changed_incumbent_fences_the_promotion(
    live: Live, registry: Registry, lora: list[Path]
) -> None:
    v1, v2, v3 = (approved(registry, p) for p in lora)
    registry.promote(v1, actor="test")
    exp_id = start(live, v2, share=0.5).json()["id"]
    registry.promote(v3, actor="another operator")  # the incumbent changes under the canary
    r = live.http.post(f"/v1/operator/experiments/{exp_id}/promote", headers=OPS)
    assert r.status_code == 409 and r.json()["error"]["code"] == "incumbent_changed", r.text
    ended = live_watch.decide_once(registry.db, registry, exp_id)
    assert ended.status == "stopped" and ended.reason.startswith("the incumbent changed")
    assert registry.get(v2).status == APPROVED and registry.active()["default"].id == v3


@pytest.mark.slow
def test_one_process_ends_an_experiment(live: Live, registry: Registry, lora: list[Path]) -> None:
    candidate = approved(registry, lora[0])
    exp_id = start(live, candidate, share=0.5).json()["id"]
    outcomes: list[str] = []

    def promote() -> None:
        try:
            outcomes.append(
                live_watch.act(registry.db, registry, exp_id, "promote", actor="r").status
            )
        except ConflictError as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=promote) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["experiment_ended"] * 3 + ["promoted"]
    promotions = [e for e in registry.events(candidate) if e.to_status == "active"]
    assert len(promotions) == 1


@pytest.mark.slow
def test_409s_and_400s(live: Live, registry: Registry, lora: list[Path]) -> None:
    v1 = approved(registry, lora[0])
    raw = registry.register(lora[1]).id  # a candidate the gate has not approved
    assert start(live, raw, share=0.5).json()["error"]["code"] == "candidate_not_approved"
    r = start(live, v1)  # no share, and PREFLOOP_CANARY_SHARE is 0 (off)
    assert r.status_code == 400 and "PREFLOOP_CANARY_SHARE" in r.json()["error"]["message"]
    r = start(live, v1, share=0.5, expect_incumbent="default@v9")
    assert r.status_code == 409 and r.json()["error"]["code"] == "incumbent_changed"
    assert start(live, v1, share=1.5).status_code == 400
    assert start(live, v1, share=0.5, policy={"nonsense": 1}).status_code == 400
    assert start(live, "default@v99", share=0.5).status_code == 404
    exp_id = start(live, v1, share=0.5, expect_incumbent="base").json()["id"]
    r = start(live, v1, share=0.5)
    assert r.status_code == 409 and r.json()["error"]["code"] == "experiment_running"
    assert exp_id in r.json()["error"]["message"]
    assert live.http.post(f"/v1/operator/experiments/{exp_id}/rollback", headers=OPS).is_success
    assert registry.get(v1).status == "rejected"
    r = live.http.post(f"/v1/operator/experiments/{exp_id}/stop", headers=OPS)
    assert r.status_code == 409 and r.json()["error"]["code"] == "experiment_ended"
    assert live.http.get("/v1/operator/experiments/exp-nope", headers=OPS).status_code == 404
    r = live.http.post(f"/v1/operator/experiments/{exp_id}/explode", headers=OPS)
    assert r.status_code == 400 and "error" in r.json()
    listed = live.http.get("/v1/operator/experiments?status=rolled_back", headers=OPS).json()
    assert [e["id"] for e in listed["data"]] == [exp_id]


@pytest.mark.slow
def test_a_restarted_app_continues_the_experiment(
    tiny_engine: Any, tiny_llama_dir: Path, tmp_path: Path, db_url: str, lora: list[Path]
) -> None:
    for name in tiny_engine.adapters():
        asyncio.run(tiny_engine.unload_adapter(name))
    settings = Settings(
        home=tmp_path,
        model=str(tiny_llama_dir),
        database_url=db_url,
        refresh_enabled=False,
        watch_interval_seconds=0,
    )
    db = make_engine(settings)
    init_db(db)
    registry = Registry(db, settings.adapters_dir)
    candidate = approved(registry, lora[0])
    exp = live_watch.start(db, registry, settings, candidate=candidate, actor="t", share=0.5)
    user = next(f"u{i}" for i in range(100) if assign(exp.id, f"u{i}", 0.5))
    body = {"messages": HELLO, "max_tokens": 3, "user": user}
    for _ in range(2):  # the same database, a new app each time: the split is the same
        with serve_thread(create_app(settings, engine=tiny_engine)) as url:
            with httpx.Client(base_url=url, timeout=30) as http:

                def version() -> str | None:
                    return http.post("/v1/chat/completions", json=body).json()["adapter_version"]

                wait_until(lambda: version() == candidate)
                assert [version() for _ in range(3)] == [candidate] * 3
        assert candidate not in tiny_engine.adapters()  # the app gave back what it loaded
    assert live_watch.arm_stats(db, exp)[0].answers >= 8
    db.dispose()


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings_overrides",
    [{"auth": "keys", "segments": ["default", "acme"], "segment_tenants": {"acme": "acme"}}],
)
def test_operators_see_their_tenants_experiments_only(
    live: Live, registry: Registry, lora: list[Path]
) -> None:
    def key(role: str, tenant: str) -> dict[str, str]:
        _row, secret = create_key(registry.db, name=f"{role}-{tenant}", role=role, tenant=tenant)
        return {"Authorization": f"Bearer {secret}"}

    ops, acme, user = key("operator", "default"), key("operator", "acme"), key("user", "acme")
    theirs = approved(registry, lora[0], segment="acme")
    r = start(live, theirs, headers=ops, share=0.2)
    assert r.status_code == 404, r.text  # another tenant's version does not exist for ops
    r = start(live, theirs, headers=acme, share=0.2)
    assert r.status_code == 201, r.text
    exp_id = r.json()["id"]
    assert live.http.get("/v1/operator/experiments", headers=ops).json()["data"] == []
    assert live.http.get(f"/v1/operator/experiments/{exp_id}", headers=ops).status_code == 404
    r = live.http.post(f"/v1/operator/experiments/{exp_id}/stop", headers=ops)
    assert r.status_code == 404
    assert live.http.get("/v1/operator/experiments", headers=user).status_code == 403
    listed = live.http.get("/v1/operator/experiments", headers=acme).json()["data"]
    assert [e["id"] for e in listed] == [exp_id]
    assert live.http.post(f"/v1/operator/experiments/{exp_id}/stop", headers=acme).is_success


@pytest.mark.slow  # trains
@pytest.mark.parametrize("settings_overrides", [{**FAST, "canary_share": 0.5}])
def test_a_refresh_with_a_canary_share_starts_a_canary_instead_of_promoting(live: Live) -> None:
    picks(live, 12)
    r = live.http.post("/v1/operator/runs", json={"segment": "default"}, headers=OPS)
    run = wait_run(live, r.json()["id"])
    assert (run["status"], run["outcome"]) == ("succeeded", "canary"), run["error"]
    assert [s["name"] for s in run["steps"]][-2:] == ["gate", "canary"]
    step = run["steps"][-1]["detail"]
    listed = live.http.get("/v1/operator/experiments", headers=OPS).json()["data"]
    assert [(e["id"], e["status"], e["candidate"], e["incumbent"], e["share"]) for e in listed] == [
        (step["experiment"], "running", "default@v1", None, 0.5)
    ]
    assert listed[0]["created_by"] == f"refresh {run['id']}"
    version = live.http.get("/v1/operator/adapters/default@v1", headers=OPS).json()
    assert version["status"] == "approved"  # not promoted: the canary decides
    on_candidate = next(f"u{i}" for i in range(100) if assign(step["experiment"], f"u{i}", 0.5))
    wait_until(lambda: served(live, on_candidate) == "default@v1")
    on_base = next(f"u{i}" for i in range(100) if not assign(step["experiment"], f"u{i}", 0.5))
    assert served(live, on_base) is None  # the others keep the base model


@pytest.mark.slow
def test_the_cli_runs_the_same_functions(tmp_path: Path, db_url: str, lora: list[Path]) -> None:
    env = {**os.environ, "PREFLOOP_DATABASE_URL": db_url, "PREFLOOP_HOME": str(tmp_path)}

    def prefloop(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "service", "canary", "--actor", "carla", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    db = make_engine(Settings(database_url=db_url))
    init_db(db)
    candidate = approved(Registry(db, tmp_path / "adapters"), lora[0])
    out = prefloop("start", candidate, "--share", "0.25", "--expect-incumbent", "base")
    assert out.returncode == 0 and "running" in out.stdout, out.stderr
    exp_id = out.stdout.split()[0]
    assert prefloop("start", candidate, "--share", "0.25").returncode == 1  # one per segment
    assert exp_id in prefloop("list", "--status", "running").stdout
    shown = json.loads(prefloop("show", exp_id).stdout)
    assert shown["now"]["candidate"]["answers"] == 0 and shown["share"] == 0.25
    out = prefloop("rollback", exp_id, "--reason", "a bad feeling")
    assert out.returncode == 0 and "rolled_back" in out.stdout, out.stderr
    ended = live_watch.get(db, exp_id)
    assert (ended.ended_by, ended.reason) == ("carla", "rollback by carla: a bad feeling")
    assert "already ended" in prefloop("stop", exp_id).stderr
    db.dispose()
