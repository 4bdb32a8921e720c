"""Property tests for the compiler: invariants for any mix of answers and feedback."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from trainer.quality import GateConfig
from trainer.records import Answer, CompileResult, Feedback
from trainer.votes import compile_pairs, rater_trust

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

T0 = datetime(2025, 1, 1, tzinfo=UTC)
USERS = ["u1", "u2", "u3", "op"]
KEYS = ["", "k1", "k2", "k3"]  # "": no key (development mode)
TEXTS = [
    "Seven minutes.",
    "seven  minutes.",
    " Seven minutes. ",
    "Three hours.",
    "",
    "x",
    "Call +1 555 123 4567 to order.",
    "Call +1 555 987 6543 to order.",
    "Boil, then cool in cold water.",
]
PROMPTS = [
    ({"role": "user", "content": "How long do I boil an egg?"},),
    (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How long do I boil an egg?"},
        {"role": "assistant", "content": "Seven minutes."},
        {"role": "user", "content": "And a soft one? mail me at a@b.io"},
    ),
    ({"role": "user", "content": "Roast a chicken?"}, {"role": "assistant", "content": "Hm?"}),
    (),
    ({"role": "user", "content": "how long do i boil an egg"},),
]
SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def batches(draw: Any) -> tuple[list[Answer], list[Feedback]]:
    answers = []
    for p in range(draw(st.integers(1, 4))):
        prompt = draw(st.sampled_from(PROMPTS))
        for i in range(draw(st.integers(1, 4))):
            answers.append(
                Answer(
                    message_id=f"m{p}-{i}",
                    completion_id=draw(st.sampled_from([f"c{p}-{i}", f"c{p}-0"])),
                    choice_index=i,
                    parent_id=f"p{p}",
                    prompt=prompt,
                    text=draw(st.sampled_from(TEXTS)),
                    tenant=draw(st.sampled_from(["t1", "t2"])),
                    user_id=draw(st.sampled_from(USERS)),
                    created_at=T0 + timedelta(minutes=draw(st.integers(0, 3))),
                    kept=draw(st.booleans()),
                    regenerated_from=draw(st.sampled_from([None, f"c{p}-0"])),
                    sampling={"temperature": draw(st.sampled_from([0.0, 0.7]))},
                    key_id=draw(st.sampled_from(KEYS)),
                )
            )
    ids = [a.message_id for a in answers] + ["ghost"]
    feedback = []
    for n in range(draw(st.integers(0, 14))):
        user = draw(st.sampled_from(USERS))
        feedback.append(
            Feedback(
                id=f"f{n}",
                message_id=draw(st.sampled_from(ids)),
                user_id=user,
                kind=draw(st.sampled_from(["thumbs", "thumbs", "pick", "edit"])),
                value=draw(st.sampled_from([1, -1, 1, -1, 0])),
                other_message_id=draw(st.sampled_from(ids)),
                text=draw(st.sampled_from(TEXTS)),
                author_role="operator" if user == "op" else "user",
                created_at=T0 + timedelta(minutes=draw(st.integers(0, 6))),
                key_id=draw(st.sampled_from(KEYS)),
            )
        )
    return answers, feedback


configs = st.builds(
    GateConfig,
    conflict_policy=st.sampled_from(["majority", "drop"]),
    max_user_share=st.sampled_from([0.25, 0.34, 0.5, 1.0]),
    min_batch_for_cap=st.integers(0, 4),
    cap_keep=st.sampled_from(["newest", "random"]),
    cap_operators=st.booleans(),
    near_dup_threshold=st.sampled_from([None, 0.5, 0.9, 1.0]),
    max_per_prompt_cluster=st.integers(1, 3),
    redact_pii=st.booleans(),
    accept_user_edits=st.booleans(),
    max_key_share=st.sampled_from([0.34, 0.5, 1.0]),
    rater_trust=st.booleans(),
    min_rater_trust=st.sampled_from([0.0, 0.25, 0.6]),
)


def _ws(text: str) -> str:
    return " ".join(text.split())


@SETTINGS
@given(batches(), configs)
def test_output_invariants(batch: tuple[list[Answer], list[Feedback]], config: GateConfig) -> None:
    result = compile_pairs(*batch, config)
    for pair in result.pairs:
        assert _ws(pair.chosen) != _ws(pair.rejected)
        assert pair.chosen.strip() and pair.rejected.strip()
        assert pair.prompt and pair.prompt[-1].role == "user"
        assert pair.chosen_message_id != pair.rejected_message_id
    for row in result.unpaired:
        assert row.completion.strip()
        assert row.prompt and row.prompt[-1].role == "user"
    keys = [p.key for p in result.pairs] + [u.key for u in result.unpaired]
    assert len(keys) == len(set(keys))
    assert all(n > 0 for n in result.dropped.values())
    reasons = Counter(x.excluded_reason for x in result.excluded)
    assert all(x.status == "excluded" for x in result.excluded)
    assert all(result.dropped[r] >= n for r, n in reasons.items())
    assert not {x.key for x in result.excluded} & result.keys


def _holds_cap(items: tuple[Any, ...], config: GateConfig) -> bool:
    if len(items) < config.min_batch_for_cap:
        return True  # the cap only applies from the minimum batch on (and never shrinks below it)
    counts = Counter(
        x.user_id for x in items if config.cap_operators or x.author_role != "operator"
    )
    return all(n <= config.max_user_share * len(items) + 1e-9 for n in counts.values())


def _holds_key_cap(items: tuple[Any, ...], config: GateConfig) -> bool:
    if len(items) < config.min_batch_for_cap:
        return True
    counts = Counter(
        x.key_id
        for x in items
        if x.key_id and (config.cap_operators or x.author_role != "operator")
    )
    return all(n <= config.max_key_share * len(items) + 1e-9 for n in counts.values())


@SETTINGS
@given(batches(), configs)
def test_user_cap_holds(batch: tuple[list[Answer], list[Feedback]], config: GateConfig) -> None:
    result = compile_pairs(*batch, config)
    assert _holds_cap(result.pairs, config)
    assert _holds_cap(result.unpaired, config)
    # ... and the per-key cap, at the same time.
    assert _holds_key_cap(result.pairs, config)
    assert _holds_key_cap(result.unpaired, config)


@SETTINGS
@given(batches(), configs)
def test_rater_trust_is_a_share_and_only_lowers_weights(
    batch: tuple[list[Answer], list[Feedback]], config: GateConfig
) -> None:
    answers, feedback = batch
    known = {a.message_id for a in answers}  # what the compiler counts: valid, on known answers
    thumbs = [f for f in feedback if f.kind == "thumbs" and f.value in (1, -1)]
    picks = [
        f
        for f in feedback
        if f.kind == "pick" and f.other_message_id and f.other_message_id != f.message_id
    ]
    thumbs, picks = ([f for f in fs if f.message_id in known] for fs in (thumbs, picks))
    trust = rater_trust(thumbs, picks)
    assert all(0 < t <= 1 for t in trust.values())
    assert "op" not in trust  # operators are not rated
    result = compile_pairs(answers, feedback, config)
    for item in (*result.pairs, *result.unpaired):
        assert 0 < item.weight <= max(1.0, config.edit_weight)
        if config.rater_trust and item.author_role == "user":
            assert trust.get(item.user_id, 1.0) >= config.min_rater_trust


@SETTINGS
@given(batches(), configs, st.randoms(use_true_random=False))
def test_deterministic_under_permutation(
    batch: tuple[list[Answer], list[Feedback]], config: GateConfig, rnd: Any
) -> None:
    answers, feedback = batch
    shuffled_answers, shuffled_feedback = list(answers), list(feedback)
    rnd.shuffle(shuffled_answers)
    rnd.shuffle(shuffled_feedback)
    assert compile_pairs(answers, feedback, config) == compile_pairs(
        shuffled_answers, shuffled_feedback, config
    )


@SETTINGS
@given(batches(), configs)
def test_rerun_with_known_keys_adds_nothing(
    batch: tuple[list[Answer], list[Feedback]], config: GateConfig
) -> None:
    first = compile_pairs(*batch, config)
    again = compile_pairs(*batch, config, known_keys=first.seen_keys)
    assert again.pairs == () and again.unpaired == () and again.excluded == ()
    assert compile_pairs(*batch, config) == first


def _flood(counts: list[int]) -> tuple[list[Answer], list[Feedback]]:
    """counts[u] thumbs-pairs by user u, each on its own conversation."""
    answers, feedback = [], []
    for u, n in enumerate(counts):
        for i in range(n):
            prompt = ({"role": "user", "content": f"question {i} of user {u}"},)
            for side, value in (("up", 1), ("down", -1)):
                mid = f"{u}-{i}-{side}"
                answers.append(
                    Answer(
                        message_id=mid,
                        completion_id=f"c-{mid}",
                        parent_id=f"{u}-{i}",
                        prompt=prompt,
                        text=f"{side} answer {i}",
                        tenant="t",
                        user_id=f"user{u}",
                        created_at=T0 + timedelta(seconds=i),
                    )
                )
                feedback.append(
                    Feedback(
                        id=f"f-{mid}",
                        message_id=mid,
                        user_id=f"user{u}",
                        kind="thumbs",
                        value=value,
                        created_at=T0 + timedelta(seconds=i),
                    )
                )
    return answers, feedback


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 120), min_size=1, max_size=8),
    st.sampled_from([0.1, 0.2, 0.25, 0.5]),
    st.integers(0, 60),
)
def test_cap_is_the_largest_that_holds(counts: list[int], share: float, min_batch: int) -> None:
    config = GateConfig(max_user_share=share, min_batch_for_cap=min_batch, near_dup_threshold=None)
    result: CompileResult = compile_pairs(*_flood(counts), config)
    out = Counter(p.user_id for p in result.pairs)
    assert _holds_cap(result.pairs, config)
    if sum(counts) < min_batch:
        assert len(result.pairs) == sum(counts)
        return
    # Maximal: every capped user would break the share with one more pair.
    for u, n in enumerate(counts):
        kept = out[f"user{u}"]
        assert kept <= n
        if kept < n:
            assert kept + 1 > share * (len(result.pairs) + 1) - 1e-9
    assert result.dropped.get("user_cap", 0) == sum(counts) - len(result.pairs)
