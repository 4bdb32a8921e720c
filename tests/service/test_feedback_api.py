"""Feedback capture and regeneration through real HTTP, on a tiny random Llama: thumbs, picks,
edits, later-vote-wins, idempotency keys, every bad input's error, and regenerate-then-keep."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from sqlmodel import select

from service.storage.tables import Completion, Feedback, Message
from tests.conftest import BOTH_DATABASES
from tests.service.conftest import Live

pytestmark = BOTH_DATABASES

HELLO = [{"role": "user", "content": "Hello there, who are you?"}]


def test_thumbs_is_stored_and_a_later_vote_replaces_it(live: Live) -> None:
    resp = live.chat(HELLO, user="alice")
    up = live.feedback(completion_id=resp["id"], rating=1, comment="nice")
    assert up.status_code == 201, up.text
    body = up.json()
    assert body["type"] == "thumbs" and body["value"] == 1 and body["user"] == "alice"
    assert body["message_id"] == resp["choices"][0]["message_id"]

    down = live.feedback(completion_id=resp["id"], rating=-1)
    assert down.status_code == 201
    assert down.json()["id"] == body["id"], "the same user's later vote updates their row"
    assert down.json()["created_at"] == body["created_at"]
    for t in (body["created_at"], body["updated_at"], down.json()["updated_at"]):
        assert t.endswith("Z"), f"{t}: timestamps are UTC and say so, stored or not"
    other = live.feedback(completion_id=resp["id"], rating=1, user="bob")
    assert other.json()["id"] != body["id"]

    with live.session() as db:
        rows = {f.user_id: f for f in db.exec(select(Feedback)).all()}
    assert set(rows) == {"alice", "bob"}
    assert rows["alice"].value == -1 and rows["alice"].comment is None
    assert rows["alice"].updated_at > rows["alice"].created_at


def test_concurrent_votes_on_one_slot_leave_one_row(live: Live) -> None:
    """Votes that share a group transaction (or race another process) upsert one slot."""
    resp = live.chat(HELLO, user="erin")

    async def votes() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as http:
            return await asyncio.gather(
                *(
                    http.post("/v1/feedback", json={"completion_id": resp["id"], "rating": r})
                    for r in [1, -1] * 8
                )
            )

    answers = asyncio.run(votes())
    assert [a.status_code for a in answers] == [201] * 16, answers[0].text
    assert len({a.json()["id"] for a in answers}) == 1
    with live.session() as db:
        (row,) = db.exec(select(Feedback).where(Feedback.user_id == "erin")).all()
    assert row.value in (1, -1)


def test_thumbs_address_one_choice_of_n(live: Live) -> None:
    resp = live.chat(HELLO, n=2)
    a = live.feedback(completion_id=resp["id"], rating=1, choice_index=0).json()
    b = live.feedback(completion_id=resp["id"], rating=-1, choice_index=1).json()
    assert a["id"] != b["id"]
    assert [a["message_id"], b["message_id"]] == [c["message_id"] for c in resp["choices"]]


def test_pick_and_edit(live: Live) -> None:
    resp = live.chat(HELLO, n=2, user="carol")
    pick = live.feedback(completion_id=resp["id"], type="pick", chosen_index=1)
    assert pick.status_code == 201, pick.text
    assert pick.json()["message_id"] == resp["choices"][1]["message_id"]
    again = live.feedback(completion_id=resp["id"], type="pick", chosen_index=0).json()
    assert again["id"] == pick.json()["id"] and again["value"] == 0, "one pick per user"

    edit = live.feedback(
        headers={"X-Operator": "olga"},
        completion_id=resp["id"],
        type="edit",
        choice_index=1,
        text="I am prefloop, a helpful assistant.",
    )
    assert edit.status_code == 201, edit.text
    e = edit.json()
    assert e["author_role"] == "operator" and e["user"] == "olga"
    assert e["text"] == "I am prefloop, a helpful assistant."
    with live.session() as db:
        stored = db.get(Feedback, pick.json()["id"])
        assert stored.other_message_id == resp["choices"][1]["message_id"]


def test_idempotency_key_replays_and_refuses_a_different_body(live: Live) -> None:
    resp = live.chat(HELLO)
    body = {"completion_id": resp["id"], "rating": 1}
    key = {"Idempotency-Key": "k-123"}
    first = live.feedback(headers=key, **body)
    retry = live.feedback(headers=key, **body)
    assert first.status_code == retry.status_code == 201
    assert retry.json() == first.json()
    assert retry.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers

    clash = live.feedback(headers=key, completion_id=resp["id"], rating=-1)
    assert clash.status_code == 409
    err = clash.json()["error"]
    assert err["param"] == "Idempotency-Key" and err["code"] == "idempotency_key_reused"
    with live.session() as db:
        (row,) = db.exec(select(Feedback)).all()
    assert row.value == 1


def test_bad_inputs_get_openai_style_errors(live: Live) -> None:
    one = live.chat(HELLO)["id"]
    two = live.chat(HELLO, n=2)["id"]
    with live.session() as db:  # a failed completion: nothing to rate
        done = db.get(Completion, one)
        db.add(
            Completion(
                id="chatcmpl-failed",
                conversation_id=done.conversation_id,
                parent_message_id=done.parent_message_id,
                model="tiny",
                base_model="tiny",
                status="failed",
                error="injected",
            )
        )
        db.commit()
    cases = [
        ({"completion_id": "chatcmpl-nope", "rating": 1}, 404, "completion_id"),
        ({"completion_id": one, "rating": 0}, 400, "rating"),
        ({"completion_id": one, "rating": 2}, 400, "rating"),
        ({"completion_id": one, "rating": True}, 400, "rating"),
        ({"completion_id": one}, 400, "rating"),
        ({"completion_id": one, "rating": 1, "choice_index": 1}, 400, "choice_index"),
        ({"completion_id": one, "rating": 1, "choice_index": -1}, 400, "choice_index"),
        ({"completion_id": one, "type": "edit", "text": "  "}, 400, "text"),
        ({"completion_id": one, "type": "pick", "chosen_index": 0}, 400, "completion_id"),
        ({"completion_id": two, "type": "pick", "chosen_index": 2}, 400, "chosen_index"),
        ({"completion_id": two, "type": "pick"}, 400, "chosen_index"),
        ({"completion_id": one, "rating": 1, "stars": 5}, 400, "stars"),
        ({"completion_id": "chatcmpl-failed", "rating": 1}, 409, "completion_id"),
    ]
    for body, status, param in cases:
        r = live.feedback(**body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param, (body, err)
        assert err["message"] and err["type"], err
    with live.session() as db:
        assert db.exec(select(Feedback)).all() == []


@pytest.mark.parametrize("stream", [False, True])
def test_regenerate_stores_a_sibling(live: Live, stream: bool) -> None:
    first = live.chat(HELLO, user="dan")
    body = {"regenerate": first["id"], "max_tokens": 6, "temperature": 1.0, "seed": 2}
    if stream:
        with live.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        new_id = json.loads(events[0])["id"]
    else:
        second = live.chat(**body)  # no messages: the prompt comes from the stored tree
        new_id = second["id"]
        assert second["conversation_id"] == first["conversation_id"]

    with live.session() as db:
        old, new = db.get(Completion, first["id"]), db.get(Completion, new_id)
        assert new.regenerated_from == old.id and new.user_id == "dan"
        assert new.parent_message_id == old.parent_message_id
        siblings = db.exec(select(Message).where(Message.parent_id == old.parent_message_id)).all()
        assert sorted(m.completion_id for m in siblings) == sorted([old.id, new.id])
        assert len(db.exec(select(Message).where(Message.role == "user")).all()) == 1


def test_regenerate_accepts_the_resent_prompt_and_refuses_others(live: Live) -> None:
    first = live.chat(HELLO)
    ok = live.chat(HELLO, regenerate=first["id"])
    assert ok["id"] != first["id"]
    for body, status, param in [
        ({"regenerate": "chatcmpl-nope"}, 404, "regenerate"),
        (
            {"regenerate": first["id"], "messages": [{"role": "user", "content": "x"}]},
            400,
            "messages",
        ),
        ({"regenerate": first["id"], "conversation_id": "conv-other"}, 400, "conversation_id"),
        ({}, 400, "messages"),
    ]:
        r = live.http.post("/v1/chat/completions", json={"max_tokens": 2, **body})
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param


def test_continuing_from_an_answer_marks_it_kept(live: Live) -> None:
    first = live.chat(HELLO)
    second = live.chat(regenerate=first["id"], seed=7)
    old_msg = first["choices"][0]["message_id"]
    new_msg = second["choices"][0]["message_id"]
    # The client resends the history as shown: with the *first* answer.
    with live.session() as db:
        old_text = db.get(Message, old_msg).content
    history = HELLO + [{"role": "assistant", "content": old_text}]
    live.chat(
        history + [{"role": "user", "content": "Thanks!"}], conversation_id=first["conversation_id"]
    )
    with live.session() as db:
        assert db.get(Message, old_msg).kept_at is not None
        assert db.get(Message, new_msg).kept_at is None
    # With parent_id, the second one.
    live.chat(
        [{"role": "user", "content": "More"}],
        conversation_id=first["conversation_id"],
        parent_id=new_msg,
    )
    with live.session() as db:
        assert db.get(Message, new_msg).kept_at is not None
