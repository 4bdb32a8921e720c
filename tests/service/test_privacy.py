"""Deleting a user (operator API and `prefloop users delete`) and the retention period, through
real HTTP against a tiny random Llama and a real SQLite file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest
from sqlmodel import select

from service.storage.tables import (
    Completion,
    Conversation,
    Feedback,
    Message,
    OperatorAction,
    PreferencePair,
    Tombstone,
)
from tests.service.conftest import Live


def pick(live: Live, user: str, i: int) -> dict[str, Any]:
    answer = live.chat([{"role": "user", "content": f"{user} asks question {i}"}], n=2, user=user)
    r = live.feedback(completion_id=answer["id"], type="pick", chosen_index=i % 2, user=user)
    assert r.status_code == 201, r.text
    return answer


def counts(live: Live, user: str) -> dict[str, int]:
    with live.session() as s:
        convs = s.exec(select(Conversation).where(Conversation.user_id == user)).all()
        conv_ids = {c.id for c in convs}
        pairs = [p for p in s.exec(select(PreferencePair)).all() if p.provenance["user_id"] == user]
        return {
            "conversations": len(convs),
            "messages": sum(m.conversation_id in conv_ids for m in s.exec(select(Message)).all()),
            "completions": len(s.exec(select(Completion).where(Completion.user_id == user)).all()),
            "feedback": len(s.exec(select(Feedback).where(Feedback.user_id == user)).all()),
            "pairs": len(pairs),
        }


def test_deleting_a_user_removes_their_data_and_keeps_them_out_of_training(live: Live) -> None:
    for i in range(3):
        pick(live, "ann", i)
        pick(live, "bob", i)
    assert live.compile()["pairs"] == 6
    before = counts(live, "bob")
    assert counts(live, "ann") == {
        "conversations": 3, "messages": 9, "completions": 3, "feedback": 3, "pairs": 3
    }  # fmt: skip

    r = live.http.delete("/v1/operator/users/ann", headers={"X-Operator": "dpo"})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "object": "user.deleted", "user": "ann", "tenant": "default", "conversations": 3,
        "messages": 9, "completions": 3, "feedback": 3, "pairs": 3,
    }  # fmt: skip
    assert counts(live, "ann") == dict.fromkeys(before, 0)
    assert counts(live, "bob") == before  # nobody else's data moved
    with live.session() as s:
        assert [t.user_id for t in s.exec(select(Tombstone)).all()] == ["ann"]
        log = s.exec(select(OperatorAction).where(OperatorAction.action == "delete_user")).one()
        assert log.actor == "dpo" and log.target_ids == ["ann"]

    # Ann comes back and keeps rating: stored, but never compiled into training data.
    for i in range(3, 5):
        pick(live, "ann", i)
    pick(live, "bob", 9)
    summary = live.compile()
    assert summary["pairs"] == 1
    with live.session() as s:
        users = {p.provenance["user_id"] for p in s.exec(select(PreferencePair)).all()}
    assert users == {"bob"}

    # The CLI does the same, from another process; deleting again removes what came since.
    env = {**os.environ, "PREFLOOP_DATABASE_URL": live.db_url}
    r = subprocess.run(
        [sys.executable, "-m", "service", "users", "delete", "ann"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "2 conversations" in r.stdout and "2 feedback" in r.stdout
    assert counts(live, "ann")["conversations"] == 0
    r = live.http.delete("/v1/operator/users/" + "x" * 300)
    assert r.status_code == 400


@pytest.mark.parametrize(
    "settings_overrides",
    [{"retention_days": 3 / 86400, "retention_check_minutes": 0.5 / 60}],  # 3 s, every 0.5 s
)
def test_retention_purges_old_conversations(live: Live) -> None:
    old = pick(live, "ann", 0)
    time.sleep(3.5)
    new = pick(live, "bob", 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with live.session() as s:
            remaining = {c.id for c in s.exec(select(Conversation)).all()}
        if old["conversation_id"] not in remaining:
            break
        time.sleep(0.2)
    assert old["conversation_id"] not in remaining
    assert new["conversation_id"] in remaining  # still within the period
    with live.session() as s:
        assert s.exec(select(Feedback).where(Feedback.completion_id == old["id"])).all() == []
        assert s.exec(select(OperatorAction).where(OperatorAction.action == "purge")).first()
