"""The feedback-to-triplet compiler: exact pairs per signal, each gate rule's drops, keys, export.

Records are built by hand; a conversation is a `parent_id` with sibling answers under it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from trainer.quality import GateConfig, prompt_tokens
from trainer.records import (
    Answer,
    ChatMessage,
    CompileResult,
    DropReason,
    Feedback,
    PreferencePair,
    dpo_pair_key,
    dpo_row,
    edit_pair_key,
    kto_key,
    kto_row,
    write_jsonl,
)
from trainer.votes import compile_pairs, match_thumbs

T0 = datetime(2025, 1, 1, tzinfo=UTC)
SYSTEM = {"role": "system", "content": "You are a helpful cooking assistant."}
PROMPT = (SYSTEM, {"role": "user", "content": "How long do I boil an egg?"})


def at(minute: float) -> datetime:
    return T0 + timedelta(minutes=minute)


def answer(
    mid: str,
    text: str | None = None,
    *,
    parent: str = "p1",
    completion: str | None = None,
    minute: float = 0,
    prompt: Any = PROMPT,
    user: str = "alice",
    tenant: str = "acme",
    **kw: Any,
) -> Answer:
    return Answer(
        message_id=mid,
        completion_id=completion or f"c-{mid}",
        parent_id=parent,
        prompt=prompt,
        text=text if text is not None else f"Answer {mid}: boil it for a while.",
        tenant=tenant,
        user_id=user,
        created_at=at(minute),
        adapter_version=kw.pop("adapter_version", "v1"),
        sampling=kw.pop("sampling", {"temperature": 0.7, "seed": 1}),
        **kw,
    )


def thumbs(fid: str, mid: str, value: int, *, user: str = "alice", minute: float = 10) -> Feedback:
    return Feedback(
        id=fid, message_id=mid, user_id=user, kind="thumbs", value=value, created_at=at(minute)
    )


def pick(fid: str, winner: str, loser: str, *, user: str = "alice", minute: float = 10) -> Feedback:
    return Feedback(
        id=fid,
        message_id=winner,
        other_message_id=loser,
        user_id=user,
        kind="pick",
        created_at=at(minute),
    )


def edit(
    fid: str, mid: str, text: str, *, user: str = "op", role: str = "operator", minute: float = 10
) -> Feedback:
    return Feedback(
        id=fid,
        message_id=mid,
        user_id=user,
        kind="edit",
        text=text,
        author_role=role,  # type: ignore[arg-type]
        created_at=at(minute),
    )


def triplets(result: CompileResult) -> list[tuple[str, str, str]]:
    return sorted((p.source, p.chosen, p.rejected) for p in result.pairs)


# ---------------------------------------------------------------------------------------------
# Signals → exact triplets


def test_regenerate_then_keep() -> None:
    a = answer("a", "Boil it for 3 hours.", minute=0)
    b = answer("b", "About 7 minutes.", minute=1, kept=True, regenerated_from="c-a")
    b = replace(b, adapter_version="v2", sampling={"temperature": 1.0})
    result = compile_pairs([a, b], [])
    assert triplets(result) == [("regenerate", "About 7 minutes.", "Boil it for 3 hours.")]
    (pair,) = result.pairs
    assert pair.prompt == (
        ChatMessage("system", SYSTEM["content"]),
        ChatMessage("user", "How long do I boil an egg?"),
    )
    assert (pair.chosen_message_id, pair.rejected_message_id) == ("b", "a")
    assert (pair.chosen_completion_id, pair.rejected_completion_id) == ("c-b", "c-a")
    assert (pair.chosen_adapter_version, pair.rejected_adapter_version) == ("v2", "v1")
    assert dict(pair.chosen_sampling) == {"temperature": 1.0}
    assert dict(pair.rejected_sampling) == {"temperature": 0.7, "seed": 1}
    assert (pair.tenant, pair.segment, pair.user_id) == ("acme", "default", "alice")
    assert pair.weight == 1.0 and pair.status == "approved"
    assert pair.key == dpo_pair_key("b", "a")
    assert result.unpaired == () and result.dropped == Counter()


def test_regenerate_twice_rejects_every_earlier_sibling_but_not_later_ones() -> None:
    answers = [
        answer("a", "First try.", minute=0),
        answer("b", "Second try.", minute=1),
        answer("c", "Third try.", minute=2, kept=True),
        answer("d", "Fourth try, after keeping the third.", minute=3),
    ]
    assert triplets(compile_pairs(answers, [])) == [
        ("regenerate", "Third try.", "First try."),
        ("regenerate", "Third try.", "Second try."),
    ]


def test_choices_of_one_completion_are_not_regenerations() -> None:
    # n=2 choices share a completion: keeping one is not a regenerate signal (a pick is).
    a = answer("a", "Choice zero.", completion="c1", choice_index=0)
    b = answer("b", "Choice one.", completion="c1", choice_index=1, minute=0.1, kept=True)
    assert compile_pairs([a, b], []).pairs == ()


def test_regenerated_answer_rated_up_counts_as_kept() -> None:
    a = answer("a", "First try.", minute=0)
    b = answer("b", "Second try.", minute=1, regenerated_from="c-a")
    result = compile_pairs([a, b], [thumbs("f1", "b", +1)])
    assert triplets(result) == [("regenerate", "Second try.", "First try.")]
    assert result.pairs[0].feedback_ids == ("f1",)
    assert result.unpaired == ()  # b's thumbs already spoke in the pair


def test_thumbs_up_vs_down_among_siblings() -> None:
    answers = [answer("a", "Good one."), answer("b", "Bad one.", minute=1), answer("c", "Meh.")]
    feedback = [thumbs("f1", "a", +1), thumbs("f2", "b", -1, minute=11)]
    result = compile_pairs(answers, feedback)
    assert triplets(result) == [("thumbs", "Good one.", "Bad one.")]
    assert result.pairs[0].feedback_ids == ("f1", "f2")
    assert result.pairs[0].created_at == at(11)


def test_thumbs_on_different_prompts_do_not_pair() -> None:
    answers = [answer("a", "Good one.", parent="p1"), answer("b", "Bad one.", parent="p2")]
    result = compile_pairs(answers, [thumbs("f1", "a", +1), thumbs("f2", "b", -1)])
    assert result.pairs == ()
    assert sorted((u.completion, u.label) for u in result.unpaired) == [
        ("Bad one.", False),
        ("Good one.", True),
    ]


def test_ab_pick() -> None:
    a = answer("a", "Option A.", completion="c1", choice_index=0)
    b = answer("b", "Option B.", completion="c1", choice_index=1)
    result = compile_pairs([a, b], [pick("f1", "b", "a", user="bob")])
    assert triplets(result) == [("pick", "Option B.", "Option A.")]
    assert result.pairs[0].user_id == "bob"
    assert result.pairs[0].feedback_ids == ("f1",)


def test_pick_between_different_prompts_is_dropped() -> None:
    a, b = answer("a", parent="p1"), answer("b", parent="p2")
    result = compile_pairs([a, b], [pick("f1", "a", "b")])
    assert result.pairs == () and result.dropped == {"not_siblings": 1}


def test_operator_edit() -> None:
    a = answer("a", "Boil it for 3 hours.")
    result = compile_pairs(
        [a], [edit("f1", "a", "7 minutes for a firm yolk.")], GateConfig(edit_weight=2.5)
    )
    assert triplets(result) == [("edit", "7 minutes for a firm yolk.", "Boil it for 3 hours.")]
    (pair,) = result.pairs
    assert pair.weight == 2.5 and pair.author_role == "operator" and pair.user_id == "op"
    assert pair.chosen_message_id is None and pair.chosen_completion_id is None
    assert pair.rejected_message_id == "a" and pair.rejected_adapter_version == "v1"
    assert pair.key == edit_pair_key("a", "7 minutes for a firm yolk.")


def test_user_edits_need_opt_in() -> None:
    a = answer("a", "Boil it for 3 hours.")
    fb = [edit("f1", "a", "Seven minutes.", user="alice", role="user")]
    assert compile_pairs([a], fb).dropped == {"edit_not_operator": 1}
    assert len(compile_pairs([a], fb, GateConfig(accept_user_edits=True)).pairs) == 1


def test_lone_thumbs_become_kto_rows() -> None:
    a = answer("a", "Seven minutes.", parent="p1")
    b = answer("b", "Three hours.", parent="p2", user="bob")
    result = compile_pairs([a, b], [thumbs("f1", "a", +1), thumbs("f2", "b", -1, user="bob")])
    assert result.pairs == ()
    rows = {u.message_id: u for u in result.unpaired}
    assert rows["a"].label is True and rows["b"].label is False
    assert rows["a"].completion == "Seven minutes." and rows["a"].key == kto_key("a", True)
    assert rows["b"].user_id == "bob" and rows["b"].feedback_ids == ("f2",)
    no_kto = compile_pairs([a, b], [thumbs("f1", "a", +1)], GateConfig(emit_unpaired=False))
    assert no_kto == CompileResult(pairs=(), unpaired=())


def test_multi_turn_prompt_is_the_whole_conversation() -> None:
    convo = [
        SYSTEM,
        {"role": "user", "content": "How long do I boil an egg?"},
        {"role": "assistant", "content": "About 7 minutes."},
        {"role": "user", "content": [{"type": "text", "text": "And a soft one?"}]},
    ]
    a = answer("a", "Also 7 minutes.", parent="m4", prompt=convo)
    b = answer("b", "About 5 minutes.", parent="m4", prompt=convo, minute=1, kept=True)
    (pair,) = compile_pairs([a, b], []).pairs
    assert [m.as_dict() for m in pair.prompt] == [
        SYSTEM,
        {"role": "user", "content": "How long do I boil an egg?"},
        {"role": "assistant", "content": "About 7 minutes."},
        {"role": "user", "content": "And a soft one?"},
    ]


def test_siblings_with_different_turns_are_not_paired() -> None:
    other = (SYSTEM, {"role": "user", "content": "Something else entirely?"})
    a = answer("a", "First.")
    b = answer("b", "Second.", prompt=other, minute=1, kept=True)
    assert compile_pairs([a, b], []).dropped == {"prompt_mismatch": 1}


def test_a_changed_system_prompt_does_not_split_siblings() -> None:
    other = ({"role": "system", "content": "Today is Friday."}, PROMPT[1])
    a = answer("a", "First.")
    b = answer("b", "Second.", prompt=other, minute=1, kept=True)
    (pair,) = compile_pairs([a, b], []).pairs
    assert pair.prompt[0].content == "Today is Friday."  # the chosen side's conversation


# ---------------------------------------------------------------------------------------------
# Conflicts


def test_same_user_later_vote_wins() -> None:
    answers = [answer("a", "Good one."), answer("b", "Bad one.")]
    feedback = [
        thumbs("f1", "a", -1, minute=1),
        thumbs("f2", "a", +1, minute=2),  # changed their mind
        thumbs("f3", "b", -1, minute=3),
    ]
    result = compile_pairs(answers, feedback)
    assert triplets(result) == [("thumbs", "Good one.", "Bad one.")]
    assert result.pairs[0].feedback_ids == ("f2", "f3")
    assert result.dropped == {"superseded_vote": 1}


def test_users_disagreeing_on_an_answer() -> None:
    a = answer("a", "Seven minutes.")
    two_to_one = [
        thumbs("f1", "a", +1, user="u1"),
        thumbs("f2", "a", +1, user="u2"),
        thumbs("f3", "a", -1, user="u3"),
    ]
    result = compile_pairs([a], two_to_one)
    assert [(u.label, u.feedback_ids) for u in result.unpaired] == [(True, ("f1", "f2"))]
    assert result.dropped == {"outvoted": 1}

    tie = two_to_one[1:]
    assert compile_pairs([a], tie).unpaired == ()
    assert compile_pairs([a], tie).dropped == {"conflicting_votes": 2}

    strict = GateConfig(conflict_policy="drop")
    assert compile_pairs([a], two_to_one, strict).unpaired == ()
    assert compile_pairs([a], two_to_one, strict).dropped == {"conflicting_votes": 3}


def test_users_disagreeing_on_a_pair() -> None:
    answers = [answer("a", "Option A."), answer("b", "Option B.")]
    tie = [pick("f1", "a", "b", user="u1"), pick("f2", "b", "a", user="u2")]
    assert compile_pairs(answers, tie).pairs == ()
    assert compile_pairs(answers, tie).dropped == {"conflicting_votes": 2}

    majority = [*tie, pick("f3", "a", "b", user="u3")]
    result = compile_pairs(answers, majority)
    assert triplets(result) == [("pick", "Option A.", "Option B.")]
    assert result.pairs[0].feedback_ids == ("f1", "f3")
    # Two picks the same way merge into one pair; the other way is outvoted.
    assert result.dropped == {"outvoted": 1, "duplicate_pair": 1}
    assert compile_pairs(answers, majority, GateConfig(conflict_policy="drop")).pairs == ()


def test_same_user_flipping_a_pick() -> None:
    answers = [answer("a", "Option A."), answer("b", "Option B.")]
    feedback = [pick("f1", "a", "b", minute=1), pick("f2", "b", "a", minute=2)]
    result = compile_pairs(answers, feedback)
    assert triplets(result) == [("pick", "Option B.", "Option A.")]
    assert result.dropped == {"superseded_vote": 1}


def test_signals_agreeing_on_a_pair_merge_under_the_most_explicit_source() -> None:
    a = answer("a", "First try.", minute=0)
    b = answer("b", "Second try.", minute=1, kept=True)
    feedback = [thumbs("f1", "b", +1), thumbs("f2", "a", -1), pick("f3", "b", "a")]
    result = compile_pairs([a, b], feedback)
    assert triplets(result) == [("pick", "Second try.", "First try.")]
    assert result.pairs[0].feedback_ids == ("f1", "f2", "f3")
    assert result.dropped == {"duplicate_pair": 2}


def test_a_later_thumbs_overrides_the_same_users_regeneration() -> None:
    # The user regenerated and kept b, then rated a up and b down: their latest word wins.
    a = answer("a", "First try.", minute=0)
    b = answer("b", "Second try.", minute=1, kept=True)
    feedback = [thumbs("f1", "a", +1, minute=5), thumbs("f2", "b", -1, minute=6)]
    result = compile_pairs([a, b], feedback)
    assert triplets(result) == [("thumbs", "First try.", "Second try.")]


def test_invalid_and_unknown_feedback() -> None:
    a = answer("a")
    feedback = [
        thumbs("f1", "a", 0),
        pick("f2", "a", "a"),
        edit("f3", "a", "   "),
        thumbs("f4", "nope", +1),
        pick("f5", "a", "nope"),
    ]
    result = compile_pairs([a], feedback)
    assert result.pairs == () and result.unpaired == ()
    assert result.dropped == {"invalid_feedback": 3, "unknown_message": 2}


def test_duplicate_message_ids_must_agree() -> None:
    a = answer("a")
    assert compile_pairs([a, a], [thumbs("f1", "a", 1)]).unpaired[0].message_id == "a"
    with pytest.raises(ValueError, match="answers share the id 'a'"):
        compile_pairs([a, replace(a, text="different")], [])
    f = thumbs("f1", "a", 1)
    with pytest.raises(ValueError, match="feedback rows share the id 'f1'"):
        compile_pairs([a], [f, replace(f, value=-1)])


# ---------------------------------------------------------------------------------------------
# Content gates


def _edit_result(original: str, ideal: str, config: GateConfig | None = None, **kw: Any):
    return compile_pairs([answer("a", original, **kw)], [edit("f1", "a", ideal)], config)


@pytest.mark.parametrize(
    ("original", "ideal", "config", "reason"),
    [
        ("   ", "Seven minutes.", None, "empty"),
        ("X", "Seven minutes.", GateConfig(min_answer_chars=2), "too_short"),
        ("Boil.", "Seven " * 100, GateConfig(max_answer_chars=100), "too_long"),
        ("Seven  minutes.\n", " Seven minutes.", None, "identical"),
        ("mail a@b.io", "mail c@d.io", None, "identical"),  # identical once redacted
    ],
)
def test_content_gates(original: str, ideal: str, config: GateConfig | None, reason: str) -> None:
    result = _edit_result(original, ideal, config)
    assert result.pairs == () and result.dropped == {reason: 1}
    (excluded,) = result.excluded
    assert excluded.status == "excluded" and excluded.excluded_reason == reason


def test_prompt_gates() -> None:
    ends_with_assistant = (*PROMPT, {"role": "assistant", "content": "Hm?"})
    result = _edit_result("Three hours.", "Seven minutes.", prompt=ends_with_assistant)
    assert result.dropped == {"prompt_not_user_last": 1}
    assert _edit_result("Three hours.", "Seven.", prompt=()).dropped == {"prompt_not_user_last": 1}
    result = _edit_result("Three hours.", "Seven minutes.", GateConfig(max_prompt_chars=20))
    assert result.dropped == {"prompt_too_long": 1}


def test_pii_is_redacted_in_prompt_and_answers() -> None:
    prompt = (SYSTEM, {"role": "user", "content": "I'm ann@example.com, card 4111 1111 1111 1111"})
    a = answer("a", "Call +44 20 7946 0958 and pay to GB82WEST12345698765432.", prompt=prompt)
    result = compile_pairs([a], [edit("f1", "a", "Never share card numbers, ann@example.com.")])
    (pair,) = result.pairs
    assert pair.prompt[1].content == "I'm [EMAIL], card [CARD]"
    assert pair.rejected == "Call [PHONE] and pay to [IBAN]."
    assert pair.chosen == "Never share card numbers, [EMAIL]."
    assert result.redactions == {"[EMAIL]": 2, "[CARD]": 1, "[PHONE]": 1, "[IBAN]": 1}
    raw = compile_pairs([a], [edit("f1", "a", "Ok.")], GateConfig(redact_pii=False))
    assert "ann@example.com" in raw.pairs[0].prompt[1].content


def test_operator_approval() -> None:
    a = answer("a", "Three hours.", tenant="acme")
    b = answer("b", "Three hours.", tenant="globex", parent="p2")
    fb = [edit("f1", "a", "Seven minutes."), edit("f2", "b", "Seven minutes.")]
    statuses = {p.tenant: p.status for p in compile_pairs([a, b], fb).pairs}
    assert statuses == {"acme": "approved", "globex": "approved"}
    cfg = GateConfig(approval_tenants=frozenset({"globex"}))
    statuses = {p.tenant: p.status for p in compile_pairs([a, b], fb, cfg).pairs}
    assert statuses == {"acme": "approved", "globex": "pending"}
    everyone = compile_pairs([a, b], fb, GateConfig(require_approval=True))
    assert {p.status for p in everyone.pairs} == {"pending"}


def test_a_preferred_answer_with_a_new_link_waits_for_an_operator() -> None:
    """Spam is monetised through links: a thumbs-up or a pick for an answer carrying a link is
    held ("pending", with the links named) even with approval off, also when the prompt asked
    for the link (as an attacker does); a rejected side's link and a thumbs-down are not."""
    spam = "Boil it. Cheap pills at https://www.Cheap-Meds.example/buy!"
    asked = ({"role": "user", "content": "Is docs.python.org any good?"},)
    answers = [
        answer("up", spam),
        answer("down", spam, parent="p2"),
        answer("win", spam, parent="p3"),
        answer("lose", "Boil it for ten minutes.", parent="p3"),
        answer("ok", "Yes, see docs.python.org.", parent="p4", prompt=asked),
        answer("plain", "Boil it for ten minutes, then rest it.", parent="p5"),
    ]
    fb = [
        thumbs("f1", "up", 1, user="u1"),
        thumbs("f2", "down", -1, user="u2"),
        pick("f3", "win", "lose", user="u3"),
        pick("f4", "lose", "win", user="u4", minute=11),
        thumbs("f5", "ok", 1, user="u5"),
        thumbs("f6", "plain", 1, user="u6"),
    ]
    result = compile_pairs(answers, fb, GateConfig(conflict_policy="drop"))
    items = {x.message_id if hasattr(x, "message_id") else x.chosen_message_id: x
             for x in (*result.pairs, *result.unpaired)}  # fmt: skip
    assert (items["up"].status, items["up"].excluded_reason) == (
        "pending", "held_link: cheap-meds.example/buy"
    )  # fmt: skip
    assert (items["ok"].status, items["ok"].excluded_reason) == (
        "pending", "held_link: docs.python.org"
    )  # fmt: skip
    assert {k: v.status for k, v in items.items() if k not in ("up", "ok")} == {
        "down": "approved", "plain": "approved"
    }  # fmt: skip
    assert result.dropped[DropReason.HELD_LINK] == 2
    held = compile_pairs(answers[2:4], [pick("f3", "win", "lose", user="u3")])
    assert [(p.status, p.excluded_reason) for p in held.pairs] == [
        ("pending", "held_link: cheap-meds.example/buy")
    ]
    off = compile_pairs(answers, fb, GateConfig(conflict_policy="drop", review_links=False))
    assert {x.status for x in (*off.pairs, *off.unpaired)} == {"approved"}


def test_config_is_validated() -> None:
    with pytest.raises(AssertionError, match="max_user_share"):
        GateConfig(max_user_share=0)
    with pytest.raises(AssertionError, match="near_dup_threshold"):
        GateConfig(near_dup_threshold=1.5)


# ---------------------------------------------------------------------------------------------
# Near-duplicate prompts


def _edited_conversation(i: int, question: str, tenant: str = "acme") -> tuple[Answer, Feedback]:
    prompt = (SYSTEM, {"role": "user", "content": question})
    a = answer(f"a{i}", "Three hours.", parent=f"p{i}", prompt=prompt, tenant=tenant)
    return a, edit(f"f{i}", f"a{i}", f"Seven minutes ({i}).", minute=i)


def test_near_duplicate_prompts_are_capped_per_cluster_keeping_the_newest() -> None:
    questions = [
        "How long do I boil an egg?",
        "how long do i boil an egg",
        "How long do I boil an egg??",
        "HOW LONG DO I BOIL AN EGG",
        "How long should I roast a chicken?",  # a different question
    ]
    rows = [_edited_conversation(i, q) for i, q in enumerate(questions)]
    result = compile_pairs([a for a, _ in rows], [f for _, f in rows])
    assert sorted(p.rejected_message_id for p in result.pairs) == ["a1", "a2", "a3", "a4"]
    assert result.dropped == {"near_duplicate_prompt": 1}

    one = compile_pairs(
        [a for a, _ in rows], [f for _, f in rows], GateConfig(max_per_prompt_cluster=1)
    )
    assert sorted(p.rejected_message_id for p in one.pairs) == ["a3", "a4"]
    off = GateConfig(near_dup_threshold=None)
    assert len(compile_pairs([a for a, _ in rows], [f for _, f in rows], off).pairs) == 5


def test_near_duplicates_are_per_tenant() -> None:
    rows = [_edited_conversation(i, "How long do I boil an egg?", f"t{i}") for i in range(5)]
    cfg = GateConfig(max_per_prompt_cluster=1)
    assert len(compile_pairs([a for a, _ in rows], [f for _, f in rows], cfg).pairs) == 5


def test_jaccard_threshold_and_system_prompt_is_ignored() -> None:
    long_system = {"role": "system", "content": " ".join(f"rule{i}" for i in range(200))}
    q1 = "what is the best way to cook rice on a stove"
    q2 = "what is the best way to cook pasta on a stove"  # Jaccard 9/11 ~ 0.82
    rows = [_edited_conversation(i, q) for i, q in enumerate([q1, q2])]
    answers = [replace(a, prompt=(long_system, *a.prompt[1:])) for a, _ in rows]
    cfg = GateConfig(max_per_prompt_cluster=1, near_dup_threshold=0.8)
    assert len(compile_pairs(answers, [f for _, f in rows], cfg).pairs) == 1
    cfg = GateConfig(max_per_prompt_cluster=1, near_dup_threshold=0.85)
    assert len(compile_pairs(answers, [f for _, f in rows], cfg).pairs) == 2
    assert "rule1" not in prompt_tokens(answers[0].prompt)


# ---------------------------------------------------------------------------------------------
# Per-user cap


def _thumbs_conversation(i: int, user: str, minute: float) -> tuple[list[Answer], list[Feedback]]:
    prompt = (SYSTEM, {"role": "user", "content": f"question {i} from {user}"})
    up = answer(
        f"{user}-{i}-up", f"Good answer {i}.", parent=f"{user}-{i}", prompt=prompt, user=user
    )
    down = answer(
        f"{user}-{i}-down", f"Bad answer {i}.", parent=f"{user}-{i}", prompt=prompt, user=user
    )
    return [up, down], [
        thumbs(f"{user}-{i}-f1", up.message_id, +1, user=user, minute=minute),
        thumbs(f"{user}-{i}-f2", down.message_id, -1, user=user, minute=minute),
    ]


def _batch(flood: int, honest_users: int, per_user: int):
    answers: list[Answer] = []
    feedback: list[Feedback] = []
    for i in range(flood):
        a, f = _thumbs_conversation(i, "mallory", minute=i)
        answers += a
        feedback += f
    for u in range(honest_users):
        for i in range(per_user):
            a, f = _thumbs_conversation(i, f"user{u}", minute=i)
            answers += a
            feedback += f
    return answers, feedback


def test_one_user_flooding_thousands_of_votes_is_capped() -> None:
    answers, feedback = _batch(flood=3000, honest_users=40, per_user=5)
    result = compile_pairs(answers, feedback, GateConfig(max_user_share=0.2))
    per_user = Counter(p.user_id for p in result.pairs)
    # 200 honest pairs; mallory may keep c with c <= 0.2 * (200 + c), i.e. 50.
    assert per_user["mallory"] == 50 and len(result.pairs) == 250
    assert all(per_user[f"user{u}"] == 5 for u in range(40))
    assert result.dropped == {"user_cap": 2950}
    assert {x.user_id for x in result.excluded} == {"mallory"}
    # The newest 50 are kept.
    kept = sorted(
        int(p.chosen_message_id.split("-")[1]) for p in result.pairs if p.user_id == "mallory"
    )
    assert kept == list(range(2950, 3000))


def test_capped_pairs_stay_out_of_later_batches_once_stored() -> None:
    answers, feedback = _batch(flood=300, honest_users=10, per_user=4)
    first = compile_pairs(answers, feedback)
    assert Counter(p.user_id for p in first.pairs)["mallory"] == 10
    for u in range(10):  # the next day: ten new users, four pairs each
        for i in range(4):
            more_answers, more_feedback = _thumbs_conversation(i, f"new{u}", minute=500)
            answers, feedback = answers + more_answers, feedback + more_feedback
    # Stored with their "excluded" rows, the flood's rest does not come back...
    second = compile_pairs(answers, feedback, known_keys=first.seen_keys)
    assert len(second.pairs) == 40 and "mallory" not in {p.user_id for p in second.pairs}
    # ...whereas knowing only the accepted keys lets the next slice of the flood in.
    leaky = compile_pairs(answers, feedback, known_keys=first.keys)
    assert Counter(p.user_id for p in leaky.pairs)["mallory"] == 10


def test_cap_with_seeded_sampling_is_deterministic() -> None:
    answers, feedback = _batch(flood=300, honest_users=10, per_user=4)
    cfg = GateConfig(cap_keep="random", seed=7)
    first = compile_pairs(answers, feedback, cfg)
    assert first == compile_pairs(list(reversed(answers)), list(reversed(feedback)), cfg)
    assert Counter(p.user_id for p in first.pairs)["mallory"] == 10
    other_seed = compile_pairs(answers, feedback, replace(cfg, seed=8))
    assert {p.key for p in first.pairs} != {p.key for p in other_seed.pairs}


def test_cap_waits_for_a_minimum_batch() -> None:
    answers, feedback = _batch(flood=30, honest_users=5, per_user=2)
    result = compile_pairs(answers, feedback, GateConfig(min_batch_for_cap=50))
    assert len(result.pairs) == 40 and "user_cap" not in result.dropped
    capped = compile_pairs(answers, feedback, GateConfig(min_batch_for_cap=40))
    per_user = Counter(p.user_id for p in capped.pairs)
    assert per_user["mallory"] == 2 and len(capped.pairs) == 12  # c <= 0.2 * (10 + c)


def test_cap_drops_everything_when_too_few_users_to_honour_it() -> None:
    # Three users can never each hold <= 20%: the batch is not diverse enough to train on.
    answers, feedback = _batch(flood=30, honest_users=2, per_user=2)
    capped = compile_pairs(answers, feedback, GateConfig(min_batch_for_cap=10))
    assert capped.pairs == () and capped.dropped == {"user_cap": 34}
    assert (
        len(
            compile_pairs(
                answers, feedback, GateConfig(min_batch_for_cap=10, max_user_share=0.5)
            ).pairs
        )
        == 8
    )  # c <= 0.5 * (4 + c)


def test_operators_are_exempt_from_the_cap_unless_configured() -> None:
    rows = [_edited_conversation(i, f"distinct question number {i}") for i in range(60)]
    answers, feedback = [a for a, _ in rows], [f for _, f in rows]
    assert len(compile_pairs(answers, feedback).pairs) == 60
    capped = compile_pairs(answers, feedback, GateConfig(cap_operators=True))
    assert capped.pairs == () and capped.dropped == {"user_cap": 60}


# ---------------------------------------------------------------------------------------------
# Keys and re-runs


def test_rerun_gives_identical_keys_and_known_keys_are_skipped() -> None:
    answers = [
        answer("a", "First try."),
        answer("b", "Second try.", minute=1, kept=True),
        answer("c", "Lonely.", parent="p2"),
    ]
    feedback = [thumbs("f1", "c", +1), edit("f2", "a", "Seven minutes.")]
    first = compile_pairs(answers, feedback)
    again = compile_pairs(list(reversed(answers)), list(reversed(feedback)))
    assert first == again
    assert len(first.keys) == 3
    assert first.seen_keys == first.keys  # nothing excluded here
    skipped = compile_pairs(answers, feedback, known_keys=first.keys)
    assert skipped.pairs == () and skipped.unpaired == ()
    assert skipped.dropped == {"already_known": 3}
    # New feedback later: only the new pair comes out.
    more = [*feedback, thumbs("f3", "b", +1, user="bob", minute=30)]
    new = compile_pairs(answers, more, known_keys=first.keys)
    assert new.pairs == () and new.dropped == {"already_known": 3}
    more = [*feedback, edit("f4", "b", "Seven minutes, then cold water.", minute=30)]
    new = compile_pairs(answers, more, known_keys=first.keys)
    assert [p.rejected_message_id for p in new.pairs] == ["b"]


def test_key_does_not_depend_on_which_signal_found_the_pair() -> None:
    a = answer("a", "First try.", minute=0)
    b = answer("b", "Second try.", minute=1, kept=True)
    regen = compile_pairs([a, b], [])
    picked = compile_pairs([a, b], [pick("f1", "b", "a")])
    assert regen.pairs[0].source != picked.pairs[0].source
    assert regen.keys == picked.keys


# ---------------------------------------------------------------------------------------------
# Export


def _mixed_result() -> CompileResult:
    answers = [
        answer("a", "First try.", minute=0),
        answer("b", "Second try.", minute=1, kept=True, sampling={}),
        answer("c", "Lonely good.", parent="p2"),
        answer("d", "Lonely bad.", parent="p3", adapter_version=""),
    ]
    feedback = [
        thumbs("f1", "c", +1),
        thumbs("f2", "d", -1),
        edit("f3", "a", "Seven minutes."),
    ]
    return compile_pairs(answers, feedback)


def test_dpo_and_kto_rows() -> None:
    result = _mixed_result()
    regen = next(p for p in result.pairs if p.source == "regenerate")
    row = dpo_row(regen)
    assert row["prompt"] == list(PROMPT)
    assert row["chosen"] == [{"role": "assistant", "content": "Second try."}]
    assert row["rejected"] == [{"role": "assistant", "content": "First try."}]
    assert row["rejected_sampling"] == '{"seed":1,"temperature":0.7}'
    assert row["chosen_sampling"] == "{}"
    edit_row = dpo_row(next(p for p in result.pairs if p.source == "edit"))
    assert edit_row["chosen_message_id"] == "" and edit_row["feedback_ids"] == '["f3"]'
    for r in [row, edit_row, *map(kto_row, result.unpaired)]:
        assert all(
            isinstance(v, str | float | bool) or k in ("prompt", "chosen", "rejected", "completion")
            for k, v in r.items()
        ), r
    kto = kto_row(next(u for u in result.unpaired if u.message_id == "d"))
    assert kto["completion"] == [{"role": "assistant", "content": "Lonely bad."}]
    assert kto["label"] is False and kto["prompt"][-1]["role"] == "user"


def test_write_jsonl_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "out" / "pairs.jsonl"
    rows = [dpo_row(p) for p in _mixed_result().pairs]
    assert write_jsonl(rows, path) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows

    def exploding():
        yield rows[0]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_jsonl(exploding(), path)
    assert len(path.read_text().splitlines()) == 2  # old file untouched
    assert [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]  # no temp file left


def _tiny_chat_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "<eos>": 1}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<eos>")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tok


def test_exported_jsonl_loads_with_datasets_and_trl(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    data_utils = pytest.importorskip("trl.data_utils")
    result = _mixed_result()
    dpo_path, kto_path = tmp_path / "dpo.jsonl", tmp_path / "kto.jsonl"
    write_jsonl(map(dpo_row, result.pairs), dpo_path)
    write_jsonl(map(kto_row, result.unpaired), kto_path)
    tokenizer = _tiny_chat_tokenizer()

    dpo = datasets.load_dataset(
        "json", data_files=str(dpo_path), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert len(dpo) == 2 and dpo.features["chosen_sampling"].dtype == "string"
    for example in dpo:
        assert data_utils.is_conversational(example)
        text = data_utils.maybe_apply_chat_template(example, tokenizer)
        assert text["prompt"].endswith("<|assistant|>")
        assert text["chosen"].startswith(example["chosen"][0]["content"])

    kto = datasets.load_dataset(
        "json", data_files=str(kto_path), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert sorted(kto["label"]) == [False, True]
    for example in kto:
        assert data_utils.is_conversational(example)
        text = data_utils.maybe_apply_chat_template(example, tokenizer)
        assert "<|user|>How long do I boil an egg?" in text["prompt"]


def test_preference_pair_is_frozen() -> None:
    pair = _mixed_result().pairs[0]
    assert isinstance(pair, PreferencePair)
    with pytest.raises(AttributeError):
        pair.chosen = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        pair.chosen_sampling["x"] = 1  # type: ignore[index]
    assert DropReason.USER_CAP == "user_cap"


# --- matched pairs from lone thumbs -----------------------------------------------------------


def _lone(*items: tuple[Answer, Feedback]) -> list:
    """Each answer rated alone (its own conversation), compiled into KTO rows."""
    config = GateConfig(near_dup_threshold=None)  # the same question, asked again and again
    result = compile_pairs([a for a, _ in items], [f for _, f in items], config)
    assert not result.pairs
    return list(result.unpaired)


def _rated(n: int, value: int, *, minute: float = 0, prompt: Any = PROMPT, **kw: Any) -> tuple:
    user, parent = kw.pop("user", f"visitor-{n}"), kw.pop("parent", f"p{n}")
    a = answer(f"m{n}", f"Answer {n}: boil it.", parent=parent, minute=minute, prompt=prompt,
               user=user, **kw)  # fmt: skip
    return a, thumbs(f"f{n}", f"m{n}", value, user=user, minute=minute + 1)


def test_an_up_and_a_down_on_the_same_question_from_two_visitors_become_a_matched_pair() -> None:
    shouty = (SYSTEM, {"role": "user", "content": "  how long do I BOIL an egg? "})
    rows = _lone(_rated(1, 1), _rated(2, -1, minute=60, prompt=shouty))
    pairs, rest = match_thumbs(rows, window_hours=168)
    assert rest == [] and len(pairs) == 1
    (pair,) = pairs
    assert (pair.source, pair.chosen, pair.rejected) == ("matched", "Answer 1: boil it.",
                                                        "Answer 2: boil it.")  # fmt: skip
    assert pair.feedback_ids == ("f1", "f2"), "provenance: both votes"
    assert (pair.chosen_message_id, pair.rejected_message_id) == ("m1", "m2")
    assert pair.user_id == "visitor-2" and pair.created_at == at(61), "the newest signal owns it"
    assert match_thumbs(list(reversed(rows)), 168)[0] == pairs, "input order does not matter"
    assert match_thumbs(rows, None) == ([], rows), "matching off"


@pytest.mark.parametrize(
    ("other", "why"),
    [
        (dict(prompt=({"role": "system", "content": "You are a pirate."}, PROMPT[1])), "system"),
        (dict(adapter_version="v2"), "another adapter generation"),
        (dict(user="visitor-1"), "one user rating both"),
        (dict(parent="p1"), "one conversation's turn (a regeneration)"),
        (dict(minute=169 * 60), "outside the window"),
        (dict(tenant="other"), "another tenant"),
        (dict(prompt=(SYSTEM, {"role": "user", "content": "How long do I boil rice?"})), "q"),
    ],
)
def test_thumbs_that_must_not_be_matched(other: dict, why: str) -> None:
    a, fa = _rated(1, 1)
    b, fb = _rated(2, -1, **other)
    rows = [replace(r, status="approved") for r in _lone((a, fa))] + [
        r for r in compile_pairs([b], [fb]).unpaired
    ]
    pairs, rest = match_thumbs(rows, window_hours=168)
    assert pairs == [] and len(rest) == 2, why


def test_each_thumb_joins_at_most_one_pair_nearest_in_time_first() -> None:
    rows = _lone(_rated(1, 1, minute=0), _rated(2, -1, minute=500), _rated(3, -1, minute=30),
                 _rated(4, 1, minute=2000))  # fmt: skip
    pairs, rest = match_thumbs(rows, window_hours=168)
    assert [(p.chosen_message_id, p.rejected_message_id) for p in pairs] == [
        ("m1", "m3"), ("m4", "m2")
    ]  # fmt: skip
    assert rest == []
    three_ups = _lone(_rated(1, 1), _rated(2, 1, minute=5), _rated(3, -1, minute=10))
    pairs, rest = match_thumbs(three_ups, window_hours=168)
    assert [(p.chosen_message_id, p.rejected_message_id) for p in pairs] == [("m2", "m3")]
    assert [r.message_id for r in rest] == ["m1"], "the unmatched up stays a KTO row"
