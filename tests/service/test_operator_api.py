"""From signals to stored triplets, through real HTTP on a tiny random Llama: each feedback
signal gives exactly its pair (or KTO row), the gate's drops are counted, PII is redacted in what
is stored, re-compiling adds nothing, and the operator queue lists, filters and edits pairs with
every action logged."""

from __future__ import annotations

from typing import Any

import pytest
from sqlmodel import select

from service.storage.tables import Message, OperatorAction, PreferencePair
from tests.conftest import BOTH_DATABASES
from tests.service.conftest import Live


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def text_of(resp: dict[str, Any], i: int = 0) -> str:
    return resp["choices"][i]["message"]["content"]


def pairs(live: Live, **filters: Any) -> list[dict[str, Any]]:
    r = live.http.get("/v1/operator/pairs", params={"limit": 500, **filters})
    assert r.status_code == 200, r.text
    return r.json()["data"]


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"pairs_edit_weight": 2.0}


def test_each_signal_gives_its_triplet(live: Live) -> None:
    # Regenerate, then keep the new answer by continuing from it; a two-turn history.
    t1 = live.chat([user("What is two plus two?")], user="rita")
    t2 = live.chat([user("And three plus three?")], conversation_id=t1["conversation_id"])
    regen = live.chat(regenerate=t2["id"], seed=5)
    live.chat(
        [user("Thanks, go on.")],
        conversation_id=t1["conversation_id"],
        parent_id=regen["choices"][0]["message_id"],
    )
    # Thumbs up on one sibling, down on the other.
    ud = live.chat([user("Name a colour of the sky.")], n=2, user="tom")
    assert live.feedback(completion_id=ud["id"], rating=1, choice_index=0).status_code == 201
    assert live.feedback(completion_id=ud["id"], rating=-1, choice_index=1).status_code == 201
    # An A/B pick.
    ab = live.chat([user("Write a short greeting for Monday.")], n=2, user="pia")
    assert live.feedback(completion_id=ab["id"], type="pick", chosen_index=1).status_code == 201
    # An operator's ideal answer for a thumbs-down; a user's edit is kept but not trained on.
    ed = live.chat([user("How do I reset my password?")], user="eve")
    live.feedback(completion_id=ed["id"], rating=-1)
    ideal = "Open Settings, choose Security, then Reset password."
    op = {"X-Operator": "olga"}
    assert live.feedback(headers=op, completion_id=ed["id"], type="edit", text=ideal).is_success
    live.feedback(completion_id=ed["id"], type="edit", text="my own better answer")
    # Lone thumbs: one up (voted down first: the later vote wins), one down.
    lone_up = live.chat([user("Tell me a fact about owls.")], user="lou")
    live.feedback(completion_id=lone_up["id"], rating=-1)
    live.feedback(completion_id=lone_up["id"], rating=1)
    lone_down = live.chat([user("Recommend a novel about the sea.")], user="lou")
    live.feedback(completion_id=lone_down["id"], rating=-1)
    # Two users disagree on one answer: no majority, dropped.
    split = live.chat([user("Is pineapple good on pizza?")])
    live.feedback(completion_id=split["id"], rating=1, user="u1")
    live.feedback(completion_id=split["id"], rating=-1, user="u2")

    summary = live.compile()
    assert summary["pairs"] == 4 and summary["unpaired"] == 2 and summary["excluded"] == 0
    assert summary["stored"] == {"approved": 6}
    assert summary["dropped"] == {"edit_not_operator": 1, "conflicting_votes": 2}

    by_source = {p["source"]: p for p in pairs(live, kind="pair")}
    assert set(by_source) == {"regenerate", "thumbs", "pick", "edit"}
    history = [
        user("What is two plus two?"),
        {"role": "assistant", "content": text_of(t1)},
        user("And three plus three?"),
    ]
    expected = {
        "regenerate": (history, text_of(regen), text_of(t2), 1.0),
        "thumbs": ([user("Name a colour of the sky.")], text_of(ud, 0), text_of(ud, 1), 1.0),
        "pick": ([user("Write a short greeting for Monday.")], text_of(ab, 1), text_of(ab, 0), 1.0),
        "edit": ([user("How do I reset my password?")], ideal, text_of(ed), 2.0),
    }
    for source, (prompt, chosen, rejected, weight) in expected.items():
        p = by_source[source]
        assert (p["prompt"], p["chosen"], p["rejected"], p["weight"]) == (
            prompt,
            chosen,
            rejected,
            weight,
        ), source
        assert p["status"] == "approved" and p["label"] is None
    assert by_source["edit"]["provenance"]["author_role"] == "operator"
    assert by_source["regenerate"]["provenance"]["chosen_completion_id"] == regen["id"]

    kto = {p["chosen"]: p for p in pairs(live, kind="unpaired")}
    assert kto == {
        text_of(lone_up): kto[text_of(lone_up)],
        text_of(lone_down): kto[text_of(lone_down)],
    }
    assert kto[text_of(lone_up)]["label"] is True
    assert kto[text_of(lone_down)]["label"] is False
    assert kto[text_of(lone_down)]["prompt"] == [user("Recommend a novel about the sea.")]
    assert all(p["rejected"] is None and p["source"] == "thumbs" for p in kto.values())

    # Compiling again stores nothing new; a new signal adds exactly its row.
    again = live.compile()
    assert again["stored"] == {} and again["dropped"]["already_known"] == 6
    late = live.chat([user("What rhymes with moon?")], user="lou")
    live.feedback(completion_id=late["id"], rating=1)
    third = live.compile()
    assert third["stored"] == {"approved": 1} and third["unpaired"] == 1
    with live.session() as db:
        assert len(db.exec(select(PreferencePair)).all()) == 7
        compiles = db.exec(select(OperatorAction).where(OperatorAction.action == "compile"))
        assert [a.actor for a in compiles] == ["ops", "ops", "ops"]


def test_pii_is_redacted_in_stored_pairs_only(live: Live) -> None:
    prompt = "Write to jane.doe@example.com or call +44 20 7946 0958 about my order."
    resp = live.chat([user(prompt)])
    live.feedback(completion_id=resp["id"], rating=1)
    summary = live.compile()
    assert summary["redactions"] == {"[EMAIL]": 1, "[PHONE]": 1}
    (row,) = pairs(live)
    assert row["prompt"] == [user("Write to [EMAIL] or call [PHONE] about my order.")]
    with live.session() as db:  # the conversation itself is kept as it was said
        assert db.exec(select(Message).where(Message.content == prompt)).first() is not None


def test_gate_excludes_short_answers_and_keeps_them_known(live: Live) -> None:
    resp = live.chat([user("Say something.")])
    # An operator's ideal answer under the 2-character minimum (PREFLOOP_PAIRS_MIN_ANSWER_CHARS).
    live.feedback(
        headers={"X-Operator": "olga"},
        completion_id=resp["id"],
        type="edit",
        text="k",
    )
    summary = live.compile()
    assert summary["excluded"] == 1 and summary["dropped"] == {"too_short": 1}
    (row,) = pairs(live, status="excluded")
    assert row["excluded_reason"] == "too_short" and row["chosen"] == "k"
    assert live.compile()["dropped"] == {"already_known": 1}


@pytest.mark.parametrize("settings_overrides", [{"pairs_require_approval": True}])
def test_operator_queue_lists_filters_and_acts(live: Live) -> None:
    a = live.chat([user("First question about tides.")], n=2, user="amy")
    live.feedback(completion_id=a["id"], type="pick", chosen_index=0, comment="clearer")
    b = live.chat([user("Second question about volcanoes.")], user="ben")
    live.feedback(completion_id=b["id"], rating=-1)
    c = live.chat([user("Third question about glaciers.")], user="cy")
    live.feedback(completion_id=c["id"], rating=1)

    def feedback(**params: Any) -> dict[str, Any]:
        r = live.http.get("/v1/operator/feedback", params=params)
        assert r.status_code == 200, r.text
        return r.json()

    newest_first = [f["user"] for f in feedback()["data"]]
    assert newest_first == ["cy", "ben", "amy"]
    assert [f["user"] for f in feedback(rating=-1)["data"]] == ["ben"]
    assert [f["user"] for f in feedback(kind="pick")["data"]] == ["amy"]
    assert [f["user"] for f in feedback(has_comment=True)["data"]] == ["amy"]
    assert [f["user"] for f in feedback(user="cy")["data"]] == ["cy"]
    assert feedback(adapter_version="nope")["data"] == []
    page = feedback(limit=2)
    assert page["has_more"] and len(page["data"]) == 2
    assert [f["user"] for f in feedback(limit=2, offset=2)["data"]] == ["amy"]
    assert feedback(since="2999-01-01T00:00:00Z")["data"] == []
    assert live.http.get("/v1/operator/feedback", params={"rating": 3}).status_code == 400

    live.compile()
    pending = pairs(live, status="pending")
    assert len(pending) == 3, "approval mode: everything waits for an operator"
    (pick,) = pairs(live, source="pick")
    kto = pairs(live, kind="unpaired")
    assert len(kto) == 2

    op = {"X-Operator": "olga"}
    r = live.http.post(f"/v1/operator/pairs/{pick['id']}/approve", headers=op)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["status"] == "approved" and r.json()["actor"] == "olga"

    flipped = live.http.post(f"/v1/operator/pairs/{pick['id']}/flip", headers=op).json()["data"][0]
    assert (flipped["chosen"], flipped["rejected"]) == (pick["rejected"], pick["chosen"])
    prov = flipped["provenance"]
    assert prov["chosen_message_id"] == pick["provenance"]["rejected_message_id"]

    replaced = live.http.post(
        f"/v1/operator/pairs/{pick['id']}/replace_chosen", json={"text": "A better answer."}
    ).json()["data"][0]
    assert replaced["chosen"] == "A better answer." and replaced["rejected"] == pick["chosen"]
    assert replaced["provenance"]["chosen_replaced_by"] == "operator"

    bulk = live.http.post(
        "/v1/operator/pairs/actions",
        json={"action": "exclude", "ids": [k["id"] for k in kto], "operator": "sam"},
    )
    assert bulk.status_code == 200, bulk.text
    assert {p["status"] for p in bulk.json()["data"]} == {"excluded"}
    assert len(pairs(live, status="excluded")) == 2
    kto_flip = live.http.post(f"/v1/operator/pairs/{kto[0]['id']}/flip").json()["data"][0]
    assert kto_flip["label"] is (not kto[0]["label"])

    with live.session() as db:
        used = db.get(PreferencePair, kto[1]["id"])
        used.status = "used"
        db.add(used)
        db.commit()
    errors = [
        ("/v1/operator/pairs/actions", {"action": "approve", "ids": ["pair-nope"]}, 404, "ids"),
        ("/v1/operator/pairs/actions", {"action": "approve", "ids": [kto[1]["id"]]}, 409, "ids"),
        ("/v1/operator/pairs/actions", {"action": "zap", "ids": [pick["id"]]}, 400, "action"),
        ("/v1/operator/pairs/actions", {"action": "approve", "ids": []}, 400, "ids"),
        (f"/v1/operator/pairs/{pick['id']}/replace_chosen", {"text": " "}, 400, "text"),
        (f"/v1/operator/pairs/{kto[0]['id']}/replace_chosen", {"text": "x"}, 400, "ids"),
    ]
    for url, body, status, param in errors:
        r = live.http.post(url, json=body)
        assert r.status_code == status, (url, body, r.text)
        assert r.json()["error"]["param"] == param, (url, r.json())
    # A refused bulk action changes nothing (all or nothing).
    mixed = {"action": "approve", "ids": [kto[0]["id"], kto[1]["id"]]}
    assert live.http.post("/v1/operator/pairs/actions", json=mixed).status_code == 409
    assert pairs(live, kind="unpaired", status="excluded")[0]["id"] == kto[0]["id"]

    with live.session() as db:
        log = db.exec(select(OperatorAction).order_by(OperatorAction.created_at)).all()
    assert [(a.action, a.actor) for a in log] == [
        ("compile", "ops"),
        ("pairs.approve", "olga"),
        ("pairs.flip", "olga"),
        ("pairs.replace_chosen", "operator"),
        ("pairs.exclude", "sam"),
        ("pairs.flip", "operator"),
    ]
    assert log[4].target_ids == [k["id"] for k in kto]
    assert log[3].detail["before"][pick["id"]]["chosen"] == pick["rejected"]


@BOTH_DATABASES
def test_a_nul_character_is_never_a_500(live: Live, db_backend: str) -> None:
    """Postgres text cannot hold NUL (SQLite can): a request carrying one is a 400 that says
    so, and nothing of it is stored (found by the fuzzer on Postgres: a 500)."""
    r = live.http.post(
        "/v1/operator/pairs/actions",
        json={"action": "approve", "ids": ["pair-\x00"]},
        headers={"X-Operator": "olga"},
    )
    chat = live.http.post(
        "/v1/chat/completions",
        json={"messages": [user("nul \x00 here")], "max_tokens": 2},
    )
    if db_backend == "postgres":
        for resp in (r, chat):
            assert resp.status_code == 400, resp.text
            assert "NUL" in resp.json()["error"]["message"]
        with live.session() as s:
            assert s.exec(select(Message)).all() == []
    else:
        assert r.status_code < 500 and chat.status_code == 200, (r.text, chat.text)
