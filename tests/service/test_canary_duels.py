"""Head-to-head canary turns (issue 23) on real parts: a tiny Llama with two real LoRA adapters,
a running experiment, widget visitors over real HTTP with keys on. A drawn "which is better?"
turn is answered once by each arm in random order (each stored answer says which), the client
is not told which is which, the pick is one win and one loss in the experiment's arms (and the
duel's answers are not counted again), and the pick compiles into a pair as picks do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, select

from adapters.registry import Registry
from service.core.config import Settings
from service.storage.tables import Completion, Message, PreferencePair
from tests.service.conftest import Live, approved
from tests.service.test_auth import SHOP, Keys
from tests.service.test_canary import wait_until
from tests.service.test_visitors import Visitor

pytestmark = pytest.mark.slow

KEYS_ON = {
    "auth": "keys",
    "auth_cache_seconds": 0.0,
    "rate_limit_requests_per_minute": 10_000,
    "rate_limit_visitor_requests_per_minute": 10_000,
    "new_visitors_per_address_per_hour": 1_000,
    "watch_interval_seconds": 0.0,  # no decision loop: the test reads the counts
}


class Canary:
    """An experiment of `candidate` against the active `incumbent`, its split in place."""

    def __init__(self, live: Live, registry: Registry, lora: list[Path]):
        self.live, self.keys = live, Keys(live)
        self.ops = self.keys.make(role="operator", name="olga")
        self.incumbent, self.candidate = approved(registry, lora[0]), approved(registry, lora[1])
        registry.promote(self.incumbent, actor="test")
        r = live.http.post(
            "/v1/operator/experiments",
            json={"candidate": self.candidate, "share": 0.5, "expect_incumbent": self.incumbent},
            headers=self.ops,
        )
        assert r.status_code == 201, r.text
        self.id = r.json()["id"]
        wait_until(lambda: self.candidate in self.models(), timeout=30)
        self.widget = self.keys.make(public=True, origins=[SHOP], name="shop")

    def models(self) -> list[str]:
        return [m["id"] for m in self.live.http.get("/v1/models", headers=self.ops).json()["data"]]

    def detail(self) -> dict[str, Any]:
        r = self.live.http.get(f"/v1/operator/experiments/{self.id}", headers=self.ops)
        assert r.status_code == 200, r.text
        return r.json()

    def arms(self) -> dict[str, dict[str, Any]]:
        return {a["arm"]: a for a in self.detail()["arms"]}


def compare(visitor: Visitor, seed: int, **body: Any) -> dict[str, Any]:
    """A widget's "which is better?" turn (n=2), sampled."""
    r = visitor.chat(n=2, max_tokens=6, temperature=1.0, seed=seed, **body)
    assert r.status_code == 200, r.text
    return r.json()


def stored(live: Live, completion_id: str) -> tuple[Completion, list[Message]]:
    with live.session() as s:
        answers = s.exec(
            select(Message)
            .where(Message.completion_id == completion_id)
            .order_by(col(Message.choice_index))
        ).all()
        return s.get(Completion, completion_id), list(answers)


@pytest.mark.parametrize("settings_overrides", [{**KEYS_ON, "canary_duel_share": 1.0}])
def test_a_duel_answers_from_both_arms_and_its_pick_is_one_win_and_one_loss(
    live: Live, registry: Registry, lora: list[Path]
) -> None:
    exp = Canary(live, registry, lora)
    ann, bob = Visitor(live, exp.widget), Visitor(live, exp.widget)
    orders = []
    duels = [compare(ann if i % 2 else bob, seed=i) for i in range(12)]
    for answer in duels:
        completion, messages = stored(live, answer["id"])
        assert completion.experiment_id == exp.id and completion.params["n"] == 2
        orders.append(tuple(m.adapter_version for m in messages))
        # The client sees two answers, not which arm wrote which.
        assert [c["index"] for c in answer["choices"]] == [0, 1]
        assert exp.candidate not in json.dumps(answer["choices"])
    assert set(orders) == {(exp.candidate, exp.incumbent), (exp.incumbent, exp.candidate)}
    # A streamed duel too (the widget streams): two choices, from the two arms.
    r = ann.post(
        "/v1/chat/completions",
        messages=[{"role": "user", "content": "Hello!"}],
        n=2,
        max_tokens=6,
        stream=True,
    )
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line[6:].startswith("{")]
    assert {c["index"] for chunk in chunks for c in chunk["choices"]} == {0, 1}
    _, streamed = stored(live, chunks[0]["id"])
    assert {m.adapter_version for m in streamed} == {exp.candidate, exp.incumbent}

    # Not drawn: one-answer turns, and an API key's n=2 (two samples of one model).
    single = ann.chat(max_tokens=4).json()
    api = exp.keys.chat(exp.keys.make(), n=2, user="someone").json()
    for plain in (single, api):
        completion, messages = stored(live, plain["id"])
        assert completion.experiment_id is None
        assert {m.adapter_version for m in messages} == {completion.adapter_version}
    arms = exp.arms()
    # The duels' answers are not counted as answers: only the two plain turns are.
    assert arms["candidate"]["answers"] + arms["incumbent"]["answers"] == 2
    assert all(a["won"] == a["lost"] == 0 for a in arms.values())

    # Ann picks the candidate's answer on one duel, the incumbent's on another; changing her
    # mind on the first still counts one pick there.
    def pick(visitor: Visitor, answer: dict[str, Any], version: str) -> None:
        _, messages = stored(live, answer["id"])
        index = [m.adapter_version for m in messages].index(version)
        r = visitor.post(
            "/v1/feedback", type="pick", completion_id=answer["id"], chosen_index=index
        )
        assert r.status_code == 201, r.text

    pick(ann, duels[1], exp.incumbent)
    pick(ann, duels[1], exp.candidate)
    pick(ann, duels[3], exp.incumbent)
    pick(bob, duels[0], exp.candidate)
    arms = exp.arms()
    assert (arms["candidate"]["won"], arms["candidate"]["lost"]) == (2, 1)
    assert (arms["incumbent"]["won"], arms["incumbent"]["lost"]) == (1, 2)
    assert (arms["candidate"]["rate"], arms["incumbent"]["rate"]) == (2 / 3, 1 / 3)
    assert exp.detail()["decision"]["outcomes"] == [3, 3]

    # Each pick compiles into a pair for the next refresh, chosen from the arm picked.
    r = live.http.post("/v1/operator/pairs/compile", headers=exp.ops)
    assert r.status_code == 200, r.text
    with Session(registry.db) as s:
        pairs = s.exec(select(PreferencePair).where(PreferencePair.source == "pick")).all()
    sides = sorted(
        (p.provenance["chosen_adapter_version"], p.provenance["rejected_adapter_version"])
        for p in pairs
    )
    assert sides == sorted(
        [(exp.candidate, exp.incumbent)] * 2 + [(exp.incumbent, exp.candidate)]
    ), [p.provenance for p in pairs]

    # Once the experiment ends, a comparison is two answers of the one version again.
    r = live.http.post(f"/v1/operator/experiments/{exp.id}/stop", headers=exp.ops)
    assert r.status_code == 200, r.text
    wait_until(lambda: exp.candidate not in exp.models())
    completion, messages = stored(live, compare(ann, seed=99)["id"])
    assert completion.experiment_id is None and completion.adapter_version == exp.incumbent
    assert [m.adapter_version for m in messages] == [exp.incumbent] * 2


@pytest.mark.parametrize("settings_overrides", [KEYS_ON])
def test_with_the_share_at_0_no_turn_is_a_duel(
    live: Live, registry: Registry, lora: list[Path]
) -> None:
    exp = Canary(live, registry, lora)
    visitor = Visitor(live, exp.widget)
    for i in range(4):
        answer = compare(visitor, seed=i)
        completion, messages = stored(live, answer["id"])
        assert completion.experiment_id is None
        assert [m.adapter_version for m in messages] == [completion.adapter_version] * 2
        r = visitor.post("/v1/feedback", type="pick", completion_id=answer["id"], chosen_index=0)
        assert r.status_code == 201, r.text
    arms = exp.arms()
    # Plain n=2 turns count as answers of the visitor's arm; their picks are no votes.
    assert arms["candidate"]["answers"] + arms["incumbent"]["answers"] == 4
    assert all(a["won"] == a["lost"] == 0 for a in arms.values())


def test_the_setting_is_a_share() -> None:
    with pytest.raises(ValueError, match="canary_duel_share"):
        Settings(canary_duel_share=1.5)
    assert Settings().canary_duel_share == 0.0
