"""The operator adapters API and the live watch, through real HTTP on a tiny model: register,
approve, promote, roll back (each bad move a clear 4xx), a broken version that cannot load
(nothing changes for users), the golden set, and an automatic rollback on a live drop."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlmodel import select

from adapters.registry import AdapterEvent
from tests.conftest import make_adapter
from tests.service.conftest import Live

# Trains and evaluates adapters.
pytestmark = pytest.mark.slow

OPS = {"X-Operator": "olga"}


@pytest.fixture(scope="module")
def trained(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("trained")
    return [make_adapter(tiny_llama_dir, root / f"a{i}", seed=200 + i) for i in range(2)]


def register(live: Live, path: Path, approve: bool = True) -> str:
    r = live.http.post("/v1/operator/adapters", json={"path": str(path)}, headers=OPS)
    assert r.status_code == 201, r.text
    vid = r.json()["id"]
    if approve:
        r = live.http.post(f"/v1/operator/adapters/{vid}/approve", headers=OPS)
        assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    return vid


def served_by(live: Live, version: str | None, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if live.chat([{"role": "user", "content": "hi"}])["adapter_version"] == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"{version} is not served")


def test_register_promote_rollback_through_the_api(live: Live, trained: list[Path]) -> None:
    v1 = register(live, trained[0])
    assert v1 == "default@v1"
    r = live.http.post(
        f"/v1/operator/adapters/{v1}/promote", json={"reason": "looks good"}, headers=OPS
    )
    assert r.status_code == 200 and r.json()["status"] == "active"
    served_by(live, v1)
    models = [m["id"] for m in live.http.get("/v1/models").json()["data"]]
    assert models == ["tiny", "default", v1]
    # The base model's name and the segment's name both reach the active version.
    assert live.chat([{"role": "user", "content": "x"}], model="default")["adapter_version"] == v1

    v2 = register(live, trained[1])
    live.http.post(f"/v1/operator/adapters/{v2}/promote", headers=OPS).raise_for_status()
    served_by(live, v2)
    listing = live.http.get("/v1/operator/adapters", headers=OPS).json()
    assert [(a["id"], a["status"]) for a in listing["data"]] == [
        (v2, "active"),
        (v1, "retired"),
    ]
    assert listing["serving"] == {"default": v2}

    r = live.http.post("/v1/operator/adapters/rollback", json={"reason": "users"}, headers=OPS)
    assert r.json() == {"segment": "default", "active": v1}
    served_by(live, v1)
    detail = live.http.get(f"/v1/operator/adapters/{v2}", headers=OPS).json()
    assert detail["status"] == "retired" and detail["status_reason"] == "users"
    assert [(e["to_status"], e["actor"]) for e in detail["events"]] == [
        ("retired", "olga"),
        ("active", "olga"),
        ("approved", "olga"),
        ("candidate", "olga"),
    ]
    assert detail["manifest"]["registry"]["id"] == v2

    # Back to the base model.
    live.http.post("/v1/operator/adapters/rollback", json={}, headers=OPS).raise_for_status()
    served_by(live, None)


def test_bad_moves_get_clear_errors(live: Live, trained: list[Path], tmp_path: Path) -> None:
    def post(path: str, json: dict | None = None) -> tuple[int, dict]:
        r = live.http.post(path, json=json, headers=OPS)
        return r.status_code, r.json()["error"]

    status, err = post("/v1/operator/adapters/default@v9/promote")
    assert status == 404 and "no adapter version 'default@v9'" in err["message"]
    vid = register(live, trained[0], approve=False)
    status, err = post(f"/v1/operator/adapters/{vid}/promote")
    assert status == 409 and err["code"] == "illegal_transition"
    assert err["message"] == (
        f"{vid} is candidate; it cannot become active "
        "(from candidate it can become: approved, rejected)"
    )
    status, err = post("/v1/operator/adapters/rollback", {})
    assert status == 409 and "nothing to roll back" in err["message"]
    status, err = post("/v1/operator/adapters", {"path": str(tmp_path / "nope")})
    assert status == 400 and "not a directory on the server" in err["message"]
    (tmp_path / "empty").mkdir()
    status, err = post("/v1/operator/adapters", {"path": str(tmp_path / "empty")})
    assert status == 400 and "no adapter_config.json" in err["message"]
    status, err = post("/v1/operator/adapters", {"path": str(trained[0]), "segment": "A B"})
    assert status == 400 and "segment 'A B' is not valid" in err["message"]
    status, err = post("/v1/operator/adapters", {"path": str(trained[0]), "colour": "red"})
    assert status == 400 and err["param"] == "colour"
    r = live.http.get("/v1/operator/adapters?status=sleeping", headers=OPS)
    assert r.status_code == 400


def test_a_version_that_cannot_load_changes_nothing_for_users(
    live: Live, trained: list[Path]
) -> None:
    good = register(live, trained[0])
    live.http.post(f"/v1/operator/adapters/{good}/promote", headers=OPS).raise_for_status()
    served_by(live, good)
    broken = register(live, trained[1])
    detail = live.http.get(f"/v1/operator/adapters/{broken}", headers=OPS).json()
    (Path(detail["path"]) / "adapter_model.safetensors").write_bytes(b"not a tensor file")

    live.http.post(f"/v1/operator/adapters/{broken}/promote", headers=OPS).raise_for_status()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        listing = live.http.get("/v1/operator/adapters", headers=OPS).json()
        if broken in listing["load_errors"]:
            break
        time.sleep(0.05)
    assert broken in listing["load_errors"]
    assert listing["serving"] == {"default": good}
    for _ in range(3):  # users are still served, by the version that loads
        assert live.chat([{"role": "user", "content": "hi"}])["adapter_version"] == good


def test_golden_set_api(live: Live, tmp_path: Path) -> None:
    item = {"prompt": "What is the capital of France?", "checks": {"contains": ["Paris"]}}
    r = live.http.put("/v1/operator/golden/capital-fr", json=item, headers=OPS)
    assert r.status_code == 200, r.text
    r = live.http.put(
        "/v1/operator/golden/short",
        json={"messages": [{"role": "user", "content": "Say hi."}], "checks": {"max_chars": 50}},
        headers=OPS,
    )
    assert r.status_code == 200, r.text
    listing = live.http.get("/v1/operator/golden", headers=OPS).json()
    assert [i["id"] for i in listing["data"]] == ["capital-fr", "short"]
    assert listing["path"] == str(tmp_path / "golden.jsonl")
    assert (listing["shipped"], listing["include_shipped"]) == (113, True), "checked beside them"
    assert (tmp_path / "golden.jsonl").read_text().count("\n") == 2

    r = live.http.put(
        "/v1/operator/golden/bad", json={"prompt": "x", "checks": {"regex": "("}}, headers=OPS
    )
    assert r.status_code == 400 and "checks.regex" in r.json()["error"]["message"]
    r = live.http.put("/v1/operator/golden/none", json={"prompt": "x", "checks": {}}, headers=OPS)
    assert r.status_code == 400
    assert live.http.delete("/v1/operator/golden/short", headers=OPS).status_code == 200
    assert live.http.delete("/v1/operator/golden/short", headers=OPS).status_code == 404
    listing = live.http.get("/v1/operator/golden", headers=OPS).json()
    assert [i["id"] for i in listing["data"]] == ["capital-fr"]


@pytest.mark.parametrize(
    "settings_overrides",
    [{"watch_interval_seconds": 0.2, "watch": {"min_votes": 8, "alpha": 0.05, "min_drop": 0.1}}],
)
def test_a_live_drop_rolls_back_automatically(live: Live, trained: list[Path]) -> None:
    v1, v2 = register(live, trained[0]), register(live, trained[1])
    live.http.post(f"/v1/operator/adapters/{v1}/promote", headers=OPS).raise_for_status()
    served_by(live, v1)

    def vote(version: str, rating: int, count: int) -> None:
        for _ in range(count):
            answer = live.chat([{"role": "user", "content": "Help me, please."}], user="u")
            assert answer["adapter_version"] == version
            r = live.feedback(completion_id=answer["id"], rating=rating)
            assert r.status_code == 201, r.text

    vote(v1, 1, 9)
    vote(v1, -1, 1)
    live.http.post(f"/v1/operator/adapters/{v2}/promote", headers=OPS).raise_for_status()
    served_by(live, v2)
    vote(v2, 1, 2)
    time.sleep(0.6)  # fewer than min_votes on v2: the watch waits
    assert live.http.get(f"/v1/operator/adapters/{v2}", headers=OPS).json()["status"] == "active"
    vote(v2, -1, 6)  # 8 votes: the watch may now judge (2/8 vs 9/10)
    served_by(live, v1)  # the watch rolled back
    detail = live.http.get(f"/v1/operator/adapters/{v2}", headers=OPS).json()
    assert detail["status"] == "retired"
    assert detail["status_reason"].startswith("live feedback dropped: thumbs-up rate 0.25 (2/8)")
    with live.session() as s:
        events = s.exec(select(AdapterEvent).where(AdapterEvent.version_id == v2)).all()
    assert [e.actor for e in events if e.to_status == "retired"] == ["watch"]
