"""One user floods thousands of adversarial votes through the real feedback API; the compile a
refresh runs holds at most the per-user cap's share of their items, and rater trust (they vote
against the majority wherever others voted too) drops them altogether."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine
from sqlmodel import Session, select

from service.core.config import Settings
from service.core.identity import Principal, Role
from service.feedback import gate_config, load_signals
from service.storage import turns
from service.storage.tables import PreferencePair, new_id
from tests.service.conftest import Live
from trainer.votes import compile_pairs

PROMPTS = 500  # the first half contested (two honest users vote too), the rest Mallory's alone
DEV = Principal(key_id=None, name="test", role=Role.admin, tenant="default")


def stored_answers(db_url: str) -> list[str]:
    """`PROMPTS` n=2 responses written straight into the database (the model's part is not
    what this test is about, and generating them would take minutes); returns their ids."""
    ids = []
    db = create_engine(db_url)
    with Session(db) as s:
        for i in range(PROMPTS):
            turn = turns.start_completion(
                s,
                caller=DEV,
                user_id=f"asker{i}",
                conversation_id=None,
                parent_id=None,
                messages=[{"role": "user", "content": f"Question {i} concerns subject {i * 7}"}],
                spec=turns.CompletionSpec("tiny", "tiny", None, params={}, stream=False),
            )
            choices = [
                turns.ChoiceRecord(new_id("msg"), 0, f"A careful answer to {i}.", "stop", 5),
                turns.ChoiceRecord(new_id("msg"), 1, f"Pills at spam{i}.example!", "stop", 5),
            ]
            turns.finish_completion(
                s, completion_id=turn.completion.id, choices=choices, status="succeeded",
                error=None, prompt_tokens=8, latency_ms=1.0,
            )  # fmt: skip
            ids.append(turn.completion.id)
        s.commit()
    db.dispose()
    return ids


def send_all(base_url: str, votes: list[dict[str, Any]], threads: int = 8) -> None:
    def worker(chunk: list[dict[str, Any]]) -> None:
        with httpx.Client(base_url=base_url, timeout=30) as http:
            for body in chunk:
                r = http.post("/v1/feedback", json=body)
                assert r.status_code == 201, r.text

    workers = [threading.Thread(target=worker, args=(votes[t::threads],)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def test_a_flood_by_one_user_is_capped_and_distrusted(live: Live) -> None:
    ids = stored_answers(live.db_url)
    honest = [
        {"completion_id": cid, "type": "pick", "chosen_index": 0, "user": f"h{(2 * i + k) % 40}"}
        for i, cid in enumerate(ids[: PROMPTS // 2])
        for k in range(2)
    ]
    send_all(live.base_url, honest)
    flood = []
    for cid in ids:
        flood += [
            {"completion_id": cid, "type": "pick", "chosen_index": 1, "user": "mallory"},
            {"completion_id": cid, "rating": 1, "choice_index": 1, "user": "mallory"},
            {"completion_id": cid, "rating": -1, "choice_index": 0, "user": "mallory"},
            {"completion_id": cid, "type": "pick", "chosen_index": 1, "user": "mallory"},
        ]
    send_all(live.base_url, flood)
    assert len(flood) == 2000

    # What the refresh's compile step stores (default settings: user cap 0.2, rater trust on).
    summary = live.compile()
    with live.session() as s:
        approved = s.exec(select(PreferencePair).where(PreferencePair.status == "approved")).all()
    owners = Counter(p.provenance["user_id"] for p in approved)
    assert owners["mallory"] == 0
    assert summary["dropped"]["low_trust"] >= PROMPTS // 2
    assert len(approved) == PROMPTS // 2  # every honest pair kept
    assert all("spam" in p.rejected for p in approved)

    # The per-user cap alone (rater trust off) holds Mallory to the capped share.
    settings = Settings(database_url=live.db_url, pairs_rater_trust=False)
    with live.session() as s:
        answers, feedback = load_signals(s)
    result = compile_pairs(answers, feedback, gate_config(settings))
    owners = Counter(p.user_id for p in result.pairs)
    share = owners["mallory"] / len(result.pairs)
    print(f"\nflood: {len(flood)} votes by one user; share with the cap alone {share:.3f}")
    assert 0 < share <= settings.pairs_max_user_share
    assert result.dropped["user_cap"] >= PROMPTS // 2 - owners["mallory"]


@pytest.mark.parametrize("settings_overrides", [{"pairs_rater_trust": False}])
def test_without_the_defences_the_flood_would_own_the_batch(live: Live) -> None:
    """The control: with the cap effectively off, Mallory owns half the batch — so the test
    above fails without the defences."""
    ids = stored_answers(live.db_url)[:100]
    send_all(
        live.base_url,
        [{"completion_id": c, "type": "pick", "chosen_index": 1, "user": "mallory"} for c in ids]
        + [{"completion_id": c, "type": "pick", "chosen_index": 0, "user": f"h{i}"}
           for i, c in enumerate(ids[:50])],
    )  # fmt: skip
    settings = Settings(database_url=live.db_url, pairs_max_user_share=1.0)
    with live.session() as s:
        answers, feedback = load_signals(s)
    result = compile_pairs(answers, feedback, gate_config(settings))
    owners = Counter(p.user_id for p in result.pairs)
    assert owners["mallory"] / len(result.pairs) >= 0.5
