"""Poisoning defences in the compiler (rater trust, the per-key cap) and in the regression gate:
an adapter really trained on flipped labels (tiny random Llama) is rejected."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adapters.gate import GateThresholds, decide
from trainer.dpo import TrainConfig, train
from trainer.evaluate import evaluate
from trainer.quality import GateConfig
from trainer.records import Answer, DropReason, Feedback
from trainer.votes import compile_pairs, rater_trust

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def prompt_pair(i: int, *, key: str = "") -> list[Answer]:
    prompt = [{"role": "user", "content": f"Question {i} is about subject {i * 7}"}]
    return [
        Answer(
            message_id=f"m{i}-{c}",
            completion_id=f"c{i}",
            parent_id=f"p{i}",
            prompt=prompt,
            text=f"Answer {c} to {i}.",
            tenant="t",
            user_id="asker",
            created_at=T0,
            choice_index=c,
            key_id=key,
        )  # fmt: skip
        for c in (0, 1)
    ]


def pick(i: int, chosen: int, user: str, *, key: str = "", minute: int = 1) -> Feedback:
    return Feedback(
        id=f"f{i}-{user}", message_id=f"m{i}-{chosen}", other_message_id=f"m{i}-{1 - chosen}",
        user_id=user, kind="pick", created_at=T0 + timedelta(minutes=minute), key_id=key,
    )  # fmt: skip


def thumb(i: int, c: int, value: int, user: str) -> Feedback:
    return Feedback(
        id=f"t{i}-{c}-{user}", message_id=f"m{i}-{c}", user_id=user, kind="thumbs",
        value=value, created_at=T0 + timedelta(minutes=2),
    )  # fmt: skip


def test_rater_trust_by_hand() -> None:
    # Item 0: a, b pick 0; c picks 1 -> majority 0. Item 1: a, c pick 1 -> no dissent.
    # Item 2: a and c disagree -> a tie, no consensus, not counted. Item 3: b alone.
    # Thumbs on m4-0: a +1, b +1, c -1 -> majority +1.
    picks = [pick(0, 0, "a"), pick(0, 0, "b"), pick(0, 1, "c"), pick(1, 1, "a"), pick(1, 1, "c"),
             pick(2, 0, "a"), pick(2, 1, "c"), pick(3, 0, "b")]  # fmt: skip
    thumbs = [thumb(4, 0, 1, "a"), thumb(4, 0, 1, "b"), thumb(4, 0, -1, "c")]
    trust = rater_trust(thumbs, picks)
    # a: 3 contested items judged, 3 agreed -> 4/4; b: 2 of 2 -> 3/3; c: 1 of 3 -> 2/4.
    assert trust == {"a": 1.0, "b": 1.0, "c": 0.5}
    # Operators are not rated; a later vote replaces the earlier one.
    late = [*picks, pick(0, 0, "c", minute=5)]
    late[-1] = Feedback(**{**late[-1].__dict__, "id": "f0-c-late"})
    assert rater_trust(thumbs, late)["c"] == 3 / 4


def test_items_of_distrusted_raters_are_excluded_and_weights_scaled() -> None:
    answers = [a for i in range(8) for a in prompt_pair(i)]
    votes = [pick(i, 0, u) for i in range(3) for u in ("h1", "h2")]
    votes += [pick(i, 1, "m") for i in (0, 1, 2, 3, 4)]  # m alone on 3
    votes += [pick(4, 0, "n"), pick(4, 0, "o")]
    votes += [pick(6, 0, "n"), pick(6, 1, "x"), pick(6, 1, "y"), pick(7, 0, "n"), pick(7, 0, "x")]
    # m: against the majority on 0, 1, 2, 4 -> trust 1/5 < 0.25. n: agrees on 4 and 7, not on
    # 6 -> (1 + 2) / (1 + 3) = 0.75.
    result = compile_pairs(answers, votes, GateConfig(rater_trust=True))
    assert "m" not in {p.user_id for p in result.pairs}
    assert result.dropped[DropReason.LOW_TRUST] == 1  # m's pair on prompt 3
    weights = {p.user_id: p.weight for p in result.pairs}
    assert weights == {"h1": 1.0, "h2": 1.0, "n": 0.75, "x": 1.0} or weights["n"] == 0.75
    assert {p.weight for p in result.pairs if p.user_id == "n"} == {0.75}
    plain = compile_pairs(answers, votes, GateConfig())
    assert "m" in {p.user_id for p in plain.pairs}  # the rule is what drops it


def test_the_per_key_cap_stops_a_key_that_invents_users() -> None:
    # An app key: 30 users, 2 items each. A leaked key: 100 invented users, 1 item each.
    answers, votes = [], []
    for i in range(60):
        answers += prompt_pair(i, key="app")
        votes.append(pick(i, 0, f"u{i // 2}", key="app"))
    for i in range(60, 160):
        answers += prompt_pair(i, key="leaked")
        votes.append(pick(i, 1, f"bot{i}", key="leaked"))
    uncapped = compile_pairs(answers, votes, GateConfig())
    keys = Counter(p.key_id for p in uncapped.pairs)
    assert keys["leaked"] / len(uncapped.pairs) > 0.6  # the per-user cap cannot see it

    # (A share cap binds every key alike: with two keys, below 0.5 it would starve both.)
    capped = compile_pairs(answers, votes, GateConfig(max_key_share=0.5))
    keys = Counter(p.key_id for p in capped.pairs)
    assert keys["leaked"] / len(capped.pairs) <= 0.5
    assert keys["app"] == 60 and capped.dropped[DropReason.KEY_CAP] == 100 - keys["leaked"]


def _rows(n: int, start: int, *, flipped: bool) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        good = f"It is {2 * i + 1}. Glad to help!"
        bad = "whatever " * (3 + i % 4)
        chosen, rejected = (bad, good) if flipped else (good, bad)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {i} plus {i + 1}?"}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


@pytest.mark.slow
def test_the_gate_rejects_an_adapter_trained_on_flipped_labels(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(lr=5e-2, epochs=3, batch_size=8, micro_batch_size=8, max_length=64,
                      eval_fraction=0.0, checkpoint_every=0, lora_r=8)  # fmt: skip
    heldout = _rows(12, 1000, flipped=False)  # the truth, as operators would hold it out
    canary = [[{"role": "user", "content": "Say hello."}], [{"role": "user", "content": "2+2?"}]]
    verdicts = {}
    for flipped in (True, False):
        pairs = tmp_path / f"pairs-{flipped}.jsonl"
        pairs.write_text("".join(json.dumps(r) + "\n" for r in _rows(32, 0, flipped=flipped)))
        out = tmp_path / f"adapter-{flipped}"
        train(cfg, pairs=pairs, base=tiny_llama_dir, out=out, progress_bar=False)
        report = evaluate(
            tiny_llama_dir, out, None, pairs=heldout, golden=[], canary=canary,
            max_new_tokens=4, progress=False,
        )  # fmt: skip
        lenient_drift = GateThresholds(max_kl=1e9, max_length_ratio=1e9, min_length_ratio=0.0,
                                       max_repetition=1.0, max_new_link_answers=10**6)  # fmt: skip
        verdicts[flipped] = (
            report["candidate"]["pairs"],
            decide(report["candidate"], report["incumbent"], lenient_drift),
        )
    (flipped_pairs, flipped_verdict), (true_pairs, true_verdict) = verdicts[True], verdicts[False]
    print(f"\nheld-out accuracy: flipped {flipped_pairs['accuracy']:.2f}, "
          f"true {true_pairs['accuracy']:.2f}")  # fmt: skip
    assert not flipped_verdict.approved
    assert any("held-out pair accuracy" in r for r in flipped_verdict.reasons)
    assert flipped_pairs["accuracy"] < 0.5 and flipped_pairs["margin"] < 0
    assert true_verdict.approved, true_verdict.reasons  # the same recipe on true labels passes
