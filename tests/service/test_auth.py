"""API keys through real HTTP (uvicorn, tiny random Llama, SQLite file): roles enforced by one
dependency, object-level checks (another key's completion is a 404), tenants that never see
each other's data, the public widget key's origins and CORS, per-key rate limits, the body
limit, and development mode's refusal to listen beyond loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine

from service.auth import create_key, hash_secret
from service.core.config import Settings
from service.main import UnsafeConfigError, create_app
from tests.service.conftest import Live

HELLO = [{"role": "user", "content": "Hello!"}]
SHOP = "https://shop.example"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {
        "auth": "keys",
        "auth_cache_seconds": 0.0,  # a revocation takes effect at once
        "segments": ["default", "acme"],
        "segment_tenants": {"acme": "acme"},
        "rate_limit_requests_per_minute": 10_000,
        "rate_limit_tokens_per_minute": 1_000_000,
    }


class Keys:
    def __init__(self, live: Live):
        self.live = live
        self.db = create_engine(live.db_url)

    def make(self, role: str = "user", tenant: str = "default", **kw: Any) -> dict[str, str]:
        _row, secret = create_key(
            self.db, name=kw.pop("name", f"{role}-{tenant}"), role=role, tenant=tenant, **kw
        )
        return {"Authorization": f"Bearer {secret}"}

    def chat(self, key: dict[str, str], **body: Any) -> httpx.Response:
        payload = {"messages": HELLO, "max_tokens": 3, "temperature": 0, **body}
        return self.live.http.post("/v1/chat/completions", json=payload, headers=key)


@pytest.fixture
def keys(live: Live) -> Keys:
    return Keys(live)


def error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_no_key_unknown_key_and_revoked_key_are_401(live: Live, keys: Keys) -> None:
    r = live.http.post("/v1/chat/completions", json={"messages": HELLO})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in error(r)["message"]
    assert live.http.get("/v1/models").status_code == 401
    r = keys.chat({"Authorization": "Bearer pfk_not-a-key"})
    assert r.status_code == 401 and error(r)["code"] == "invalid_api_key"
    assert live.http.get("/healthz").status_code == 200  # probes need no key

    key = keys.make()
    assert keys.chat(key).status_code == 200
    # Revoked through the CLI, from another process: refused from then on.
    env = {**os.environ, "PREFLOOP_DATABASE_URL": live.db_url}
    listing = subprocess.run(
        [sys.executable, "-m", "service", "keys", "list"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    key_id = listing.split()[0]
    subprocess.run([sys.executable, "-m", "service", "keys", "revoke", key_id], env=env, check=True)
    assert keys.chat(key).status_code == 401


def test_roles_are_enforced_by_the_dependency(live: Live, keys: Keys) -> None:
    user, operator, admin = keys.make("user"), keys.make("operator"), keys.make("admin")
    r = live.http.get("/v1/operator/pairs", headers=user)
    assert r.status_code == 403 and "operator key" in error(r)["message"]
    assert live.http.get("/v1/operator/pairs", headers=operator).status_code == 200
    golden = {"prompt": "Capital of France?", "checks": {"contains": ["Paris"]}}
    r = live.http.put("/v1/operator/golden/fr", json=golden, headers=operator)
    assert r.status_code == 403 and "admin key" in error(r)["message"]
    assert live.http.put("/v1/operator/golden/fr", json=golden, headers=admin).status_code == 200
    # Every operator route is behind the check: walk the app's own route table.
    for route in live.http.get("/openapi.json").json()["paths"]:
        if route.startswith("/v1/operator/"):
            path = route.replace("{", "").replace("}", "")
            for method in ("get", "post", "put", "delete"):
                r = live.http.request(method, path, headers=user)
                assert r.status_code in (403, 405), (method, path, r.status_code)

    # The audit log names the operator key's holder; a body cannot claim another name.
    answer = keys.chat(user, n=2, temperature=1.0, seed=1).json()
    r = live.http.post(
        "/v1/feedback",
        json={"completion_id": answer["id"], "type": "pick", "chosen_index": 0},
        headers=user,
    )
    assert r.status_code == 201 and r.json()["author_role"] == "user"
    r = live.http.post("/v1/operator/pairs/compile", json={"operator": "mallory"}, headers=operator)
    assert r.status_code == 200
    with live.session() as s:
        from sqlmodel import select

        from service.storage.tables import OperatorAction

        actors = {a.actor for a in s.exec(select(OperatorAction)).all()}
    assert actors == {"operator-default"}


def test_a_user_key_sees_only_its_own_completions(live: Live, keys: Keys) -> None:
    alice, bob = keys.make(name="alice"), keys.make(name="bob")
    operator, other_ops = keys.make("operator"), keys.make("operator", "acme")
    mine = keys.chat(alice, user="alice").json()
    cid = mine["id"]

    r = live.http.get(f"/v1/chat/completions/{cid}", headers=alice)
    assert r.status_code == 200, r.text
    stored = r.json()
    assert stored["status"] == "succeeded" and stored["user"] == "alice"
    assert stored["choices"][0]["message"]["content"] == mine["choices"][0]["message"]["content"]

    # Bob gets 404s, exactly as for an id that does not exist, for every way in.
    for r in (
        live.http.get(f"/v1/chat/completions/{cid}", headers=bob),
        live.http.post("/v1/feedback", json={"completion_id": cid, "rating": 1}, headers=bob),
        keys.chat(bob, messages=[], regenerate=cid),
        keys.chat(bob, conversation_id=mine["conversation_id"]),
        live.http.get(f"/v1/chat/completions/{cid}", headers=other_ops),
    ):
        assert r.status_code == 404, r.text
        assert cid not in r.text or "not found" in error(r)["message"]
        assert mine["choices"][0]["message"]["content"] not in r.text
    nope = live.http.get("/v1/chat/completions/chatcmpl-nope", headers=bob)
    assert nope.status_code == 404

    # Alice may rate, regenerate and continue; her tenant's operator may read it.
    r = live.http.post("/v1/feedback", json={"completion_id": cid, "rating": 1}, headers=alice)
    assert r.status_code == 201, r.text
    assert keys.chat(alice, messages=[], regenerate=cid).status_code == 200
    assert keys.chat(alice, conversation_id=mine["conversation_id"]).status_code == 200
    assert live.http.get(f"/v1/chat/completions/{cid}", headers=operator).status_code == 200


def test_tenants_never_see_each_other(live: Live, keys: Keys) -> None:
    d_user, d_ops = keys.make("user", "default"), keys.make("operator", "default")
    a_user, a_ops = keys.make("user", "acme"), keys.make("operator", "acme")
    admin = keys.make("admin")

    # Each tenant chats through the segments it owns; another tenant's is a 404.
    assert keys.chat(d_user).status_code == 200
    r = keys.chat(a_user)  # the base model's name is the `default` segment, tenant default
    assert r.status_code == 404 and error(r)["code"] == "model_not_found"
    assert keys.chat(d_user, model="acme").status_code == 404
    a_answer = keys.chat(a_user, model="acme", n=2, temperature=1.0, seed=3).json()
    d_answer = keys.chat(d_user, n=2, temperature=1.0, seed=4).json()
    ids = lambda r: [m["id"] for m in r.json()["data"]]  # noqa: E731
    assert ids(live.http.get("/v1/models", headers=a_user)) == ["acme"]
    assert "acme" not in ids(live.http.get("/v1/models", headers=d_user))
    # One model's card follows the same rules: another tenant's is a 404, as if it did not exist.
    assert live.http.get("/v1/models/acme", headers=a_user).json()["id"] == "acme"
    r = live.http.get("/v1/models/acme", headers=d_user)
    assert r.status_code == 404 and error(r)["code"] == "model_not_found"

    for key, answer in ((a_user, a_answer), (d_user, d_answer)):
        r = live.http.post(
            "/v1/feedback",
            json={"completion_id": answer["id"], "type": "pick", "chosen_index": 1},
            headers=key,
        )
        assert r.status_code == 201, r.text
    assert live.http.post("/v1/operator/pairs/compile", headers=admin).status_code == 200

    def listing(path: str, key: dict[str, str]) -> list[dict[str, Any]]:
        r = live.http.get(path, headers=key)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    a_pairs, d_pairs = listing("/v1/operator/pairs", a_ops), listing("/v1/operator/pairs", d_ops)
    assert {p["tenant"] for p in a_pairs} == {"acme"} and {p["segment"] for p in a_pairs} == {
        "acme"
    }
    assert {p["tenant"] for p in d_pairs} == {"default"}
    assert len(listing("/v1/operator/pairs", admin)) == len(a_pairs) + len(d_pairs)
    a_fb = listing("/v1/operator/feedback", a_ops)
    assert [f["completion_id"] for f in a_fb] == [a_answer["id"]]
    # Acting on the other tenant's pair: it does not exist.
    r = live.http.post(f"/v1/operator/pairs/{d_pairs[0]['id']}/approve", headers=a_ops)
    assert r.status_code == 404
    r = live.http.post(
        "/v1/operator/pairs/actions",
        json={"action": "exclude", "ids": [d_pairs[0]["id"]]},
        headers=a_ops,
    )
    assert r.status_code == 404
    # Adapters and runs of the other tenant's segments are 404s too.
    assert live.http.get("/v1/operator/adapters/acme@v1", headers=d_ops).status_code == 404
    r = live.http.post("/v1/operator/runs", json={"segment": "acme"}, headers=d_ops)
    assert r.status_code == 404
    r = live.http.post("/v1/operator/adapters/rollback", json={"segment": "default"}, headers=a_ops)
    assert r.status_code == 404

    # The thumbs-up chart with no segment named counts only the operator's own tenant's votes.
    for key, answer, rating in ((a_user, a_answer, 1), (d_user, d_answer, -1)):
        r = live.http.post(
            "/v1/feedback", json={"completion_id": answer["id"], "rating": rating}, headers=key
        )
        assert r.status_code == 201, r.text

    def votes(key: dict[str, str]) -> tuple[int, int]:
        r = live.http.get("/v1/operator/stats/thumbs", headers=key)
        assert r.status_code == 200, r.text
        buckets = [p for series in r.json()["data"] for p in series["points"]]
        return sum(b["up"] for b in buckets), sum(b["down"] for b in buckets)

    assert votes(a_ops) == (1, 0)  # acme's one vote, none of default's
    assert votes(admin) == (1, 1)


def test_public_widget_key_origins_and_cors(live: Live, keys: Keys) -> None:
    widget = keys.make(public=True, origins=[SHOP], name="shop-widget")
    preflight = {"Origin": SHOP, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    r = live.http.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == SHOP
    assert "authorization" in r.headers["access-control-allow-headers"]
    r = live.http.options(
        "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers

    r = keys.chat({**widget, "Origin": SHOP}, user="visitor-1")
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == SHOP
    cid = r.json()["id"]
    visitor = {"X-Prefloop-Visitor": r.headers["x-prefloop-visitor"]}  # as widget.js keeps it
    r = live.http.post(
        "/v1/feedback",
        json={"completion_id": cid, "rating": -1},
        headers={**widget, "Origin": SHOP, **visitor},
    )
    assert r.status_code == 201, r.text
    # From elsewhere, or with no Origin at all, the key is refused.
    for origin in ({"Origin": "https://evil.example"}, {}):
        r = keys.chat({**widget, **origin})
        assert r.status_code == 403 and error(r)["type"] == "permission_error"
    # Chat and rating only: no operator routes, even from its own origin.
    r = live.http.get("/v1/operator/feedback", headers={**widget, "Origin": SHOP})
    assert r.status_code == 403 and "public" in error(r)["message"]


@pytest.mark.parametrize(
    "settings_overrides",
    [{"auth": "keys", "rate_limit_requests_per_minute": 3, "rate_limit_tokens_per_minute": 20}],
)
def test_per_key_rate_limits_answer_429_with_retry_after(live: Live, keys: Keys) -> None:
    a, b = keys.make(name="a"), keys.make(name="b")
    assert [keys.chat(a, max_tokens=2).status_code for _ in range(3)] == [200, 200, 200]
    r = keys.chat(a, max_tokens=2)
    assert r.status_code == 429 and error(r)["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 20
    # Tokens: 20 a minute, counted as max_tokens x n before generating.
    assert keys.chat(b, max_tokens=8).status_code == 200
    assert keys.chat(b, max_tokens=8).status_code == 200
    r = keys.chat(b, max_tokens=8)
    assert r.status_code == 429 and "token budget" in error(r)["message"]
    assert int(r.headers["retry-after"]) >= 1


@pytest.mark.parametrize("settings_overrides", [{"max_body_bytes": 2048, "max_n": 2}])
def test_request_limits(live: Live) -> None:
    # Development mode here (no keys): the limits hold for everyone.
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    r = live.http.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and error(r)["code"] == "request_too_large"
    r = live.http.post("/v1/feedback", content=b"{" + b" " * 4000 + b"}",
                       headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 400

    r = live.http.post("/v1/chat/completions", content=chunked(),
                       headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413
    for body, param in (
        ({"messages": HELLO, "n": 3}, "n"),
        ({"messages": HELLO, "max_tokens": 5000}, "max_tokens"),
        ({"messages": HELLO * 200}, None),  # too many messages is also over 2 KB: a 413
    ):
        r = live.http.post("/v1/chat/completions", json=body)
        assert r.status_code in (400, 413), r.text
        if param:
            assert error(r)["param"] == param
    # A misspelt filter is an error, not a silently unfiltered list.
    r = live.http.get("/v1/operator/pairs", params={"stauts": "approved"})
    assert r.status_code == 400 and error(r)["param"] == "stauts"
    assert "status" in error(r)["message"]
    assert live.http.get("/v1/operator/pairs", params={"status": "approved"}).status_code == 200


def test_dev_mode_refuses_a_non_loopback_host(tmp_path: Path) -> None:
    with pytest.raises(UnsafeConfigError, match="PREFLOOP_AUTH=keys"):
        create_app(Settings(home=tmp_path, host="0.0.0.0"))
    create_app(Settings(home=tmp_path, host="0.0.0.0", auth="keys"))  # keys: fine
    env = {**os.environ, "PREFLOOP_HOME": str(tmp_path), "PREFLOOP_AUTH": "off"}
    r = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--host", "0.0.0.0"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert "development mode" in r.stderr and "PREFLOOP_AUTH=keys" in r.stderr


def test_keys_cli_shows_the_secret_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    db_path = tmp_path / "k.db"
    env = {**os.environ, "PREFLOOP_DATABASE_URL": f"sqlite:///{db_path}"}
    r = subprocess.run(
        [sys.executable, "-m", "service", "keys", "create", "--name", "olga", "--role",
         "operator", "--tenant", "acme"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    secret = r.stdout.strip()
    assert secret.startswith("pfk_") and len(secret) > 40
    assert "shown once" in r.stderr
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("k.db*"))
    assert secret.encode() not in raw and secret[4:].encode() not in raw
    assert hash_secret(secret).encode() in raw
    listing = subprocess.run(
        [sys.executable, "-m", "service", "keys", "list"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "operator" in listing and "acme" in listing and "olga" in listing
    assert secret not in listing
    r = subprocess.run(
        [sys.executable, "-m", "service", "keys", "create", "--name", "w", "--public"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "origins" in r.stderr
