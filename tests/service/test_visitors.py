"""Widget visitors, through real HTTP with keys on: the server issues each visitor a signed id
and ignores the `user` a caller names, so one visitor cannot pose as many users or act on
another visitor's answers; limits per visitor and per address as well as per key."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlmodel import select

from service.storage.tables import Completion, Feedback
from tests.service.conftest import Live
from tests.service.test_auth import HELLO, SHOP, Keys, error

VISITOR = "X-Prefloop-Visitor"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"auth": "keys", "auth_cache_seconds": 0.0, "rate_limit_requests_per_minute": 10_000}


@pytest.fixture
def keys(live: Live) -> Keys:
    return Keys(live)


class Visitor:
    """A browser running the widget: keeps the token the server hands it, as widget.js does."""

    def __init__(self, live: Live, key: dict[str, str], token: str | None = None):
        self.live, self.key, self.token = live, key, token

    def post(self, path: str, **body: Any) -> httpx.Response:
        headers = {**self.key, "Origin": SHOP, **({VISITOR: self.token} if self.token else {})}
        r = self.live.http.post(path, json=body, headers=headers)
        self.token = r.headers.get(VISITOR, self.token)
        return r

    def chat(self, **body: Any) -> httpx.Response:
        return self.post(
            "/v1/chat/completions", **{"messages": HELLO, "max_tokens": 3, "temperature": 0, **body}
        )


def test_visitors_get_server_issued_ids_and_only_their_own_answers(live: Live, keys: Keys) -> None:
    widget = keys.make(public=True, origins=[SHOP], name="shop")
    ann, bob = Visitor(live, widget), Visitor(live, widget)
    r = ann.chat(user="alice")
    assert r.status_code == 200, r.text
    answer = r.json()
    assert ann.token and r.headers["access-control-expose-headers"].count(VISITOR.lower())
    first = ann.token
    assert ann.chat().status_code == 200 and ann.token == first  # kept, not re-issued
    assert bob.chat(user="alice").status_code == 200 and bob.token != ann.token

    with live.session() as s:
        users = {c.user_id for c in s.exec(select(Completion)).all()}
    visitor = lambda v: f"visitor:{v.token.split('.')[0]}"  # noqa: E731
    assert users == {visitor(ann), visitor(bob)}  # "alice" was ignored both times

    # Bob cannot rate, regenerate or continue Ann's answer: to him it does not exist.
    r = bob.post("/v1/feedback", completion_id=answer["id"], rating=-1)
    assert r.status_code == 404, r.text
    assert bob.chat(messages=[], regenerate=answer["id"]).status_code == 404
    r = bob.chat(conversation_id=answer["conversation_id"])
    assert r.status_code == 404 and error(r)["param"] == "conversation_id"
    # Ann can; naming other users does not give her more votes on the same answer.
    for name in ("u1", "u2", "u3"):
        r = ann.post("/v1/feedback", completion_id=answer["id"], rating=-1, user=name)
        assert r.status_code == 201, r.text
    assert ann.chat(messages=[], regenerate=answer["id"]).status_code == 200
    with live.session() as s:
        votes = s.exec(select(Feedback.user_id)).all()
    assert votes == [visitor(ann)]

    # A forged or other-key token is a new visitor, not the one it names.
    forged = Visitor(live, widget, token=first.split(".")[0] + "." + "0" * 32)
    assert forged.chat().status_code == 200 and forged.token != first
    other = keys.make(public=True, origins=[SHOP], name="other-site")
    moved = Visitor(live, other, token=first)
    assert moved.chat().status_code == 200 and moved.token != first


@pytest.mark.parametrize(
    "settings_overrides",
    [
        {
            "auth": "keys",
            "rate_limit_requests_per_minute": 10_000,
            "rate_limit_visitor_requests_per_minute": 2,
            "new_visitors_per_address_per_hour": 3,
        }
    ],
)
def test_limits_per_visitor_and_new_visitors_per_address(live: Live, keys: Keys) -> None:
    widget = keys.make(public=True, origins=[SHOP])
    ann = Visitor(live, widget)
    assert [ann.chat().status_code for _ in range(3)] == [200, 200, 429]
    r = ann.chat()
    assert "this visitor" in error(r)["message"] and int(r.headers["retry-after"]) >= 1
    # Dropping the token to become someone new works a few times an hour per address.
    fresh = [Visitor(live, widget).chat() for _ in range(3)]
    assert [r.status_code for r in fresh] == [200, 200, 429]
    assert "new visitors" in error(fresh[-1])["message"]
    # A user key (a server-side app) is limited per key only, and names its users itself.
    user = keys.make()
    assert all(keys.chat(user, user=f"u{i}").status_code == 200 for i in range(4))
