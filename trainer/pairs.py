"""Feedback → preference triplets: the compiler between stored chat feedback and DPO/KTO training.

The service turns its rows into the frozen records below (`Answer`, `Feedback`) and calls
`compile_pairs`; it gets back a `CompileResult` with DPO `PreferencePair`s, unpaired KTO
`UnpairedExample`s, and a Counter of everything the quality gate dropped, by reason. Pure Python
(no torch, no `service` import), deterministic, and independent of input order, so it is cheap to
test and safe to re-run: the same data always yields the same pairs under the same `key`s.

Signals (siblings = answers sharing `parent_id`, i.e. regenerations / `n>1` choices of one turn):

| signal                                           | chosen          | rejected             |
|--------------------------------------------------|-----------------|----------------------|
| regenerate, then keep (or thumbs-up) the new one | kept answer     | each earlier sibling |
| thumbs up on one sibling, down on another        | up              | down                 |
| A/B pick                                         | picked          | other                |
| operator edit                                    | operator's text | the edited answer    |
| thumbs on an answer in no pair above             | KTO row (prompt, completion, label)    |

When a refresh selects its data, `match_thumbs` joins stored KTO rows into matched pairs
(source "matched"): an up and a down on answers to the same question from different
conversations (see its docstring for the whole rule). Lone thumbs that find no match train as
KTO rows.

Pipeline, one small function per step, each drop counted under a `DropReason`:

1. `_resolve_thumbs`: per (user, answer) the latest thumbs vote wins; across users the majority
   wins (ties dropped), or any disagreement drops the answer's votes (`conflict_policy="drop"`).
2. `_regenerate_votes`, `_thumbs_votes`, `_pick_votes`, `_edit_pairs`: signals → candidate votes.
3. `_settle`: per unordered message pair, a user's latest direction wins; users are counted per
   direction as in step 1; votes agreeing on the winning direction merge into one pair.
4. keys (`dpo_pair_key` & co.); keys in `known_keys` are skipped (re-runs add nothing).
   Items turned down from here on come back in `CompileResult.excluded` (status "excluded"):
   storing them makes their keys known, so a flood cut by the cap stays cut in later runs.
5. PII redaction (`trainer.redact`) of prompts and answers.
6. content checks: prompt must end with a user turn; empty / too short / too long / identical.
7. near-duplicate prompts (token-set Jaccard) clustered per tenant; the newest few per cluster kept.
8. per-user cap on the share of the batch.
9. status: "pending" where operator approval is required, else "approved".

Drop counts are in the unit dropped at that step: feedback rows in step 1 and for invalid
feedback, candidate votes in step 3, pairs / KTO rows afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from trainer.redact import redact

Source = Literal["regenerate", "thumbs", "pick", "edit", "matched"]
Status = Literal["pending", "approved", "excluded"]
Role = Literal["user", "operator"]

# When several signals agree on the same (chosen, rejected) message pair, the merged pair is
# labelled with the most explicit one: an A/B pick was asked for, a regeneration is inferred.
_SOURCE_PRIORITY: dict[str, int] = {"pick": 0, "thumbs": 1, "regenerate": 2, "matched": 3}

_KEY_NAMESPACE = "prefloop-pairs-v1"


class DropReason(StrEnum):
    """Why the gate dropped something; the keys of `CompileResult.dropped`."""

    INVALID_FEEDBACK = "invalid_feedback"  # thumbs value not ±1, pick without other, empty edit
    UNKNOWN_MESSAGE = "unknown_message"  # feedback names an answer that was not passed in
    SUPERSEDED_VOTE = "superseded_vote"  # the same user voted again later
    CONFLICTING_VOTES = "conflicting_votes"  # users disagree and no majority (or policy "drop")
    OUTVOTED = "outvoted"  # minority side of a disagreement under policy "majority"
    NOT_SIBLINGS = "not_siblings"  # a pick between answers to different prompts
    EDIT_NOT_OPERATOR = "edit_not_operator"  # an edit by a user while user edits are off
    PROMPT_MISMATCH = "prompt_mismatch"  # two sides were answers to different conversations
    DUPLICATE_PAIR = "duplicate_pair"  # several signals for one pair, merged into one
    ALREADY_KNOWN = "already_known"  # key in `known_keys`
    PROMPT_NOT_USER_LAST = "prompt_not_user_last"  # empty prompt or last turn not the user's
    PROMPT_TOO_LONG = "prompt_too_long"
    EMPTY = "empty"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    IDENTICAL = "identical"  # chosen == rejected after whitespace normalisation (and redaction)
    NEAR_DUPLICATE_PROMPT = "near_duplicate_prompt"
    USER_CAP = "user_cap"
    KEY_CAP = "key_cap"  # over one API key's share of the batch (see GateConfig.max_key_share)
    LOW_TRUST = "low_trust"  # its rater mostly disagrees with the majority (see rater_trust)
    # Not a drop: held for an operator ("pending") whatever the approval setting.
    HELD_LINK = "held_link"  # the preferred answer has a link


# ---------------------------------------------------------------------------------------------
# Input records


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def as_messages(messages: Iterable[ChatMessage | Mapping[str, Any]]) -> tuple[ChatMessage, ...]:
    """OpenAI-format messages (dicts) → `ChatMessage`s.

    Content given as a list of parts keeps only its text parts; `None` content (an assistant turn
    that only called tools) becomes "". Training here is text-only.
    """
    out = []
    for m in messages:
        if isinstance(m, ChatMessage):
            out.append(m)
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        out.append(
            ChatMessage(role=str(m["role"]), content="" if content is None else str(content))
        )
    return tuple(out)


def _freeze_mapping(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, kw_only=True)
class Answer:
    """One assistant message: one choice of one completion, as the service stored it.

    `prompt` is the whole conversation up to this turn (dicts are accepted and converted).
    Timestamps, here and in `Feedback`, should all be timezone-aware (UTC): "latest vote wins"
    compares them, and Python refuses to compare naive with aware ones.
    Siblings — regenerations and `n>1` choices of the same turn — share `parent_id`, the id of
    the last prompt message. `kept` means the user continued the conversation from this answer.
    """

    message_id: str
    completion_id: str
    parent_id: str
    prompt: tuple[ChatMessage, ...]
    text: str
    tenant: str
    user_id: str
    created_at: datetime
    choice_index: int = 0
    segment: str = "default"
    adapter_version: str = ""
    sampling: Mapping[str, Any] = field(default_factory=dict, hash=False)
    kept: bool = False
    regenerated_from: str | None = None  # completion id this was regenerated from
    key_id: str = ""  # the API key that asked (its kept-answer signal counts against that key)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", as_messages(self.prompt))
        object.__setattr__(self, "sampling", _freeze_mapping(self.sampling))


@dataclass(frozen=True, kw_only=True)
class Feedback:
    """One feedback row.

    - thumbs: `value` is +1 or -1 on `message_id`.
    - pick: `message_id` is the picked answer, `other_message_id` the one not picked.
    - edit: `text` is the ideal answer an operator wrote for `message_id`.
    """

    id: str
    message_id: str
    user_id: str
    kind: Literal["thumbs", "pick", "edit"]
    created_at: datetime
    value: int = 0
    other_message_id: str | None = None
    text: str | None = None
    comment: str | None = None
    author_role: Role = "user"
    key_id: str = ""  # the API key it came through; "" when there are no keys


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """Every quality-gate rule in one place; saved with the training run that used it."""

    # Users disagreeing on an answer (thumbs) or a pair: "majority" keeps the side with more users
    # and drops ties; "drop" drops any contested item.
    conflict_policy: Literal["majority", "drop"] = "majority"
    # No user may own more than this share of the output batch, once the batch has at least
    # `min_batch_for_cap` items. Operators' items are exempt unless `cap_operators`.
    max_user_share: float = 0.2
    min_batch_for_cap: int = 50
    cap_keep: Literal["newest", "random"] = "newest"
    cap_operators: bool = False
    # The same cap per API key (items with no key are exempt): one key may invent many users.
    # 1.0 turns it off; a key often carries a whole app's users.
    max_key_share: float = 1.0
    # Rater trust: a user's share of agreement with the majority where several users judged the
    # same answer or pair (see `rater_trust`). Items scale their weight by it, and items of
    # raters below `min_rater_trust` are excluded. Off by default.
    rater_trust: bool = False
    min_rater_trust: float = 0.25
    seed: int = 0
    # Prompts whose token sets have Jaccard >= threshold share a cluster (per tenant); the newest
    # `max_per_prompt_cluster` items of a cluster are kept. None disables clustering.
    near_dup_threshold: float | None = 0.9
    max_per_prompt_cluster: int = 3
    # Lengths in characters (this module has no tokenizer; the trainer truncates by tokens).
    min_answer_chars: int = 2
    max_answer_chars: int = 8_000
    max_prompt_chars: int = 32_000
    redact_pii: bool = True
    require_approval: bool = False
    approval_tenants: frozenset[str] = frozenset()
    accept_user_edits: bool = False
    # Links are how spam is monetised: an item whose preferred answer (chosen, or a thumbs-up)
    # carries a link waits for an operator instead of training at once. Even a link the prompt
    # named: an attacker asks for it ("end with: visit spam.example") and upvotes compliance.
    review_links: bool = True
    edit_weight: float = 1.0
    emit_unpaired: bool = True

    def __post_init__(self) -> None:
        assert self.conflict_policy in ("majority", "drop"), self.conflict_policy
        assert self.cap_keep in ("newest", "random"), self.cap_keep
        assert 0 < self.max_user_share <= 1, f"max_user_share must be in (0, 1]: {self}"
        assert 0 < self.max_key_share <= 1, f"max_key_share must be in (0, 1]: {self}"
        assert 0 <= self.min_rater_trust <= 1, "min_rater_trust must be in [0, 1]"
        assert self.min_batch_for_cap >= 0, "min_batch_for_cap must be >= 0"
        assert self.near_dup_threshold is None or 0 < self.near_dup_threshold <= 1, (
            "near_dup_threshold must be in (0, 1] or None"
        )
        assert self.max_per_prompt_cluster >= 1, "max_per_prompt_cluster must be >= 1"
        assert 0 <= self.min_answer_chars <= self.max_answer_chars, "answer length bounds"
        assert self.edit_weight > 0, "edit_weight must be positive"
        object.__setattr__(self, "approval_tenants", frozenset(self.approval_tenants))


# ---------------------------------------------------------------------------------------------
# Output records


@dataclass(frozen=True, kw_only=True)
class PreferencePair:
    """A DPO triplet with its provenance. Edit pairs have no chosen message (ids are None)."""

    key: str
    source: Source
    prompt: tuple[ChatMessage, ...]
    chosen: str
    rejected: str
    weight: float
    status: Status
    tenant: str
    segment: str
    user_id: str  # whose signal this is; the per-user cap counts by it
    author_role: Role
    created_at: datetime  # time of the newest signal behind the pair
    chosen_message_id: str | None
    rejected_message_id: str
    chosen_completion_id: str | None
    rejected_completion_id: str
    chosen_adapter_version: str | None
    rejected_adapter_version: str
    chosen_sampling: Mapping[str, Any] = field(default_factory=dict, hash=False)
    rejected_sampling: Mapping[str, Any] = field(default_factory=dict, hash=False)
    feedback_ids: tuple[str, ...] = ()
    # The DropReason when status == "excluded"; why it waits for an operator when "pending"
    # (`HELD_LINK`: its preferred answer has a link).
    excluded_reason: str = ""
    key_id: str = ""  # the API key of `user_id`'s signal; the per-key cap counts by it


@dataclass(frozen=True, kw_only=True)
class UnpairedExample:
    """A KTO row: one answer with a thumbs label and no pair to go with it."""

    key: str
    prompt: tuple[ChatMessage, ...]
    completion: str
    label: bool
    weight: float
    status: Status
    tenant: str
    segment: str
    user_id: str
    author_role: Role
    created_at: datetime
    message_id: str
    completion_id: str
    adapter_version: str
    sampling: Mapping[str, Any] = field(default_factory=dict, hash=False)
    feedback_ids: tuple[str, ...] = ()
    source: Source = "thumbs"
    excluded_reason: str = ""  # the DropReason, when status == "excluded"
    key_id: str = ""
    parent_id: str = ""  # the prompt's last message: answers in one conversation turn share it


@dataclass(frozen=True)
class CompileResult:
    """What one compile produced.

    `pairs` / `unpaired` passed the gate (status "approved" or "pending"). `excluded` holds the
    materialised items the gate turned down (status "excluded", `excluded_reason` set), for the
    operator console and so that storing them makes their keys known. `dropped` counts every drop,
    including signals that never became an item (conflicts, invalid feedback) and known keys.
    """

    pairs: tuple[PreferencePair, ...]
    unpaired: tuple[UnpairedExample, ...]
    excluded: tuple[PreferencePair | UnpairedExample, ...] = ()
    dropped: Counter[str] = field(default_factory=Counter, hash=False)  # DropReason → count
    redactions: Counter[str] = field(default_factory=Counter, hash=False)  # placeholder → count

    @property
    def keys(self) -> frozenset[str]:
        """Keys of the accepted items."""
        return frozenset(p.key for p in self.pairs) | {u.key for u in self.unpaired}

    @property
    def seen_keys(self) -> frozenset[str]:
        """Accepted and excluded keys: pass these (as stored) as `known_keys` next time."""
        return self.keys | {x.key for x in self.excluded}


# ---------------------------------------------------------------------------------------------
# Keys


def _key(kind: str, *parts: str) -> str:
    # \x1f (unit separator) cannot appear in ids and keeps ("a", "bc") apart from ("ab", "c").
    return hashlib.sha256("\x1f".join((_KEY_NAMESPACE, kind, *parts)).encode()).hexdigest()[:32]


def dpo_pair_key(chosen_message_id: str, rejected_message_id: str) -> str:
    """Key of a message-vs-message pair. The source is deliberately left out: a pair first found
    through a regeneration and later confirmed by thumbs is the same pair, not a new one."""
    return _key("dpo", chosen_message_id, rejected_message_id)


def edit_pair_key(rejected_message_id: str, edit_text: str) -> str:
    return _key("edit", rejected_message_id, edit_text)


def kto_key(message_id: str, label: bool) -> str:
    # The label is part of the key: if the majority flips, that is a new row, not the old one.
    return _key("kto", message_id, "1" if label else "0")


# ---------------------------------------------------------------------------------------------
# Step 1: thumbs labels per answer


@dataclass(frozen=True)
class _Voter:
    user_id: str
    at: datetime
    role: Role
    feedback_id: str | None  # None for implicit signals (a kept answer)
    key_id: str = ""


@dataclass(frozen=True)
class _Label:
    value: int  # +1 / -1
    voters: tuple[_Voter, ...]


def _latest_per(rows: Sequence[Feedback], key: Any, drops: Counter[str]) -> list[Feedback]:
    """Keep each key's latest row (rows must be sorted by time); count the rest as superseded."""
    latest: dict[Any, Feedback] = {}
    for row in rows:
        if key(row) in latest:
            drops[DropReason.SUPERSEDED_VOTE] += 1
        latest[key(row)] = row
    return list(latest.values())


def _decide(
    users: Mapping[Any, int], units: Mapping[Any, int], policy: str, drops: Counter[str]
) -> Any:
    """The side backed by more distinct users, or None when contested without a majority (or
    contested at all under policy "drop"). Drops are counted in `units` (rows or votes)."""
    live = [side for side in users if users[side] > 0]
    if len(live) <= 1:
        return live[0] if live else None
    ranked = sorted(live, key=lambda side: -users[side])
    if policy == "drop" or users[ranked[0]] == users[ranked[1]]:
        drops[DropReason.CONFLICTING_VOTES] += sum(units[side] for side in live)
        return None
    drops[DropReason.OUTVOTED] += sum(units[side] for side in ranked[1:])
    return ranked[0]


def _resolve_thumbs(
    thumbs: Sequence[Feedback], policy: str, drops: Counter[str]
) -> dict[str, _Label]:
    latest = _latest_per(thumbs, lambda f: (f.user_id, f.message_id), drops)
    camps: dict[str, dict[int, list[_Voter]]] = defaultdict(lambda: {1: [], -1: []})
    for f in latest:
        camps[f.message_id][f.value].append(
            _Voter(f.user_id, f.created_at, f.author_role, f.id, f.key_id)
        )
    labels = {}
    for message_id, sides in camps.items():
        sizes = {side: len(voters) for side, voters in sides.items()}  # one row per user here
        winner = _decide(sizes, sizes, policy, drops)
        if winner is not None:
            labels[message_id] = _Label(winner, tuple(sides[winner]))
    return labels


# ---------------------------------------------------------------------------------------------
# Step 2: signals → candidate votes


@dataclass(frozen=True)
class _Vote:
    """One signal saying `chosen_id` beats `rejected_id`."""

    source: Source
    chosen_id: str
    rejected_id: str
    voters: tuple[_Voter, ...]


def _siblings(answers: Mapping[str, Answer]) -> dict[str, list[Answer]]:
    groups: dict[str, list[Answer]] = defaultdict(list)
    for a in answers.values():
        groups[a.parent_id].append(a)
    return groups


def _regenerate_votes(
    siblings: Mapping[str, list[Answer]], labels: Mapping[str, _Label]
) -> list[_Vote]:
    """A kept answer (or a regeneration rated up) beats each earlier sibling the user left."""

    def keeper_voters(a: Answer) -> tuple[_Voter, ...]:
        voters: tuple[_Voter, ...] = ()
        if a.kept:
            voters += (_Voter(a.user_id, a.created_at, "user", None, a.key_id),)
        label = labels.get(a.message_id)
        if a.regenerated_from is not None and label is not None and label.value > 0:
            voters += label.voters
        return voters

    votes = []
    for group in siblings.values():
        keepers = {a.message_id: keeper_voters(a) for a in group}
        for kept in group:
            if not keepers[kept.message_id]:
                continue
            for earlier in group:
                if (
                    earlier.created_at < kept.created_at
                    and earlier.completion_id != kept.completion_id
                    and not keepers[earlier.message_id]  # also kept: the user wanted both
                    and getattr(labels.get(earlier.message_id), "value", 0) <= 0
                ):
                    votes.append(
                        _Vote(
                            "regenerate",
                            kept.message_id,
                            earlier.message_id,
                            keepers[kept.message_id],
                        )
                    )
    return votes


def _thumbs_votes(
    siblings: Mapping[str, list[Answer]], labels: Mapping[str, _Label]
) -> list[_Vote]:
    votes = []
    for group in siblings.values():
        rated = [a for a in group if a.message_id in labels]
        ups = [a for a in rated if labels[a.message_id].value > 0]
        downs = [a for a in rated if labels[a.message_id].value < 0]
        for up in ups:
            for down in downs:
                voters = labels[up.message_id].voters + labels[down.message_id].voters
                votes.append(_Vote("thumbs", up.message_id, down.message_id, voters))
    return votes


def _pick_votes(
    picks: Sequence[Feedback], answers: Mapping[str, Answer], drops: Counter[str]
) -> list[_Vote]:
    latest = _latest_per(
        picks, lambda f: (f.user_id, frozenset((f.message_id, f.other_message_id))), drops
    )
    votes = []
    for f in latest:
        assert f.other_message_id is not None  # filtered as invalid before
        if f.other_message_id not in answers:
            drops[DropReason.UNKNOWN_MESSAGE] += 1
        elif answers[f.message_id].parent_id != answers[f.other_message_id].parent_id:
            drops[DropReason.NOT_SIBLINGS] += 1
        else:
            voter = _Voter(f.user_id, f.created_at, f.author_role, f.id, f.key_id)
            votes.append(_Vote("pick", f.message_id, f.other_message_id, (voter,)))
    return votes


# ---------------------------------------------------------------------------------------------
# Step 3: settle votes per message pair


def _settle(votes: Sequence[_Vote], policy: str, drops: Counter[str]) -> list[_Vote]:
    """One vote per unordered message pair, or none if contested without a majority."""
    by_pair: dict[tuple[str, str], list[_Vote]] = defaultdict(list)
    for v in votes:
        by_pair[tuple(sorted((v.chosen_id, v.rejected_id)))].append(v)  # type: ignore[arg-type]

    settled = []
    for (a, b), group in sorted(by_pair.items()):
        # A user's latest direction counts; their older opposite votes are superseded. (Equal
        # times compare the direction's id, only so the outcome never depends on input order.)
        latest: dict[str, tuple[datetime, str]] = {}
        for v in group:
            for voter in v.voters:
                mine = (voter.at, v.chosen_id)
                latest[voter.user_id] = max(latest.get(voter.user_id, mine), mine)
        camps: dict[str, list[_Voter]] = {a: [], b: []}
        for v in group:
            camps[v.chosen_id].extend(x for x in v.voters if latest[x.user_id][1] == v.chosen_id)
        n_votes = {d: sum(v.chosen_id == d for v in group) for d in (a, b)}
        users = {d: len({x.user_id for x in camps[d]}) for d in (a, b)}
        for d in (a, b):
            if n_votes[d] and not users[d]:  # all its voters later voted the other way
                drops[DropReason.SUPERSEDED_VOTE] += n_votes[d]
        winner = _decide(users, n_votes, policy, drops)
        if winner is None:
            continue
        agreeing = [v for v in group if v.chosen_id == winner]
        drops[DropReason.DUPLICATE_PAIR] += len(agreeing) - 1
        source = min((v.source for v in agreeing), key=_SOURCE_PRIORITY.__getitem__)
        voters = tuple(sorted(set(camps[winner]), key=lambda x: (x.at, x.user_id)))
        loser = b if winner == a else a
        settled.append(_Vote(source, winner, loser, voters))
    return settled


# ---------------------------------------------------------------------------------------------
# Step 2b/4: materialise pairs and KTO rows


def _same_conversation(a: Answer, b: Answer) -> bool:
    # System prompts may be regenerated per request (dates, tenant notes); the turns must match.
    def turns(x: Answer) -> tuple[ChatMessage, ...]:
        return tuple(m for m in x.prompt if m.role != "system")

    return turns(a) == turns(b)


def _attribution(voters: Sequence[_Voter]) -> _Voter:
    """The item belongs to the newest voter behind it (ties: smallest user id, then row id)."""
    newest = max(v.at for v in voters)
    return min(
        (v for v in voters if v.at == newest), key=lambda v: (v.user_id, v.feedback_id or "")
    )


def _pair_from_vote(
    vote: _Vote, answers: Mapping[str, Answer], drops: Counter[str]
) -> PreferencePair | None:
    chosen, rejected = answers[vote.chosen_id], answers[vote.rejected_id]
    if not _same_conversation(chosen, rejected):
        drops[DropReason.PROMPT_MISMATCH] += 1
        return None
    who = _attribution(vote.voters)
    return PreferencePair(
        key=dpo_pair_key(chosen.message_id, rejected.message_id),
        source=vote.source,
        prompt=chosen.prompt,
        chosen=chosen.text,
        rejected=rejected.text,
        weight=1.0,
        status="approved",
        tenant=chosen.tenant,
        segment=chosen.segment,
        user_id=who.user_id,
        key_id=who.key_id,
        author_role=who.role,
        created_at=who.at,
        chosen_message_id=chosen.message_id,
        rejected_message_id=rejected.message_id,
        chosen_completion_id=chosen.completion_id,
        rejected_completion_id=rejected.completion_id,
        chosen_adapter_version=chosen.adapter_version,
        rejected_adapter_version=rejected.adapter_version,
        chosen_sampling=chosen.sampling,
        rejected_sampling=rejected.sampling,
        feedback_ids=tuple(sorted({x.feedback_id for x in vote.voters if x.feedback_id})),
    )


def _edit_pairs(
    edits: Sequence[Feedback],
    answers: Mapping[str, Answer],
    config: GateConfig,
    drops: Counter[str],
) -> list[PreferencePair]:
    pairs: dict[str, PreferencePair] = {}
    for f in _latest_per(edits, lambda f: (f.user_id, f.message_id), drops):
        if f.author_role != "operator" and not config.accept_user_edits:
            drops[DropReason.EDIT_NOT_OPERATOR] += 1
            continue
        original = answers[f.message_id]
        assert f.text is not None  # filtered as invalid before
        key = edit_pair_key(original.message_id, f.text)
        if key in pairs:  # two operators wrote the same text
            drops[DropReason.DUPLICATE_PAIR] += 1
            continue
        pairs[key] = PreferencePair(
            key=key,
            source="edit",
            prompt=original.prompt,
            chosen=f.text,
            rejected=original.text,
            weight=config.edit_weight,
            status="approved",
            tenant=original.tenant,
            segment=original.segment,
            user_id=f.user_id,
            key_id=f.key_id,
            author_role=f.author_role,
            created_at=f.created_at,
            chosen_message_id=None,
            rejected_message_id=original.message_id,
            chosen_completion_id=None,
            rejected_completion_id=original.completion_id,
            chosen_adapter_version=None,
            rejected_adapter_version=original.adapter_version,
            rejected_sampling=original.sampling,
            feedback_ids=(f.id,),
        )
    return list(pairs.values())


def _unpaired(
    labels: Mapping[str, _Label], answers: Mapping[str, Answer], paired: Collection[str]
) -> list[UnpairedExample]:
    rows = []
    for message_id, label in labels.items():
        if message_id in paired:
            continue
        a, who = answers[message_id], _attribution(label.voters)
        rows.append(
            UnpairedExample(
                key=kto_key(message_id, label.value > 0),
                prompt=a.prompt,
                completion=a.text,
                label=label.value > 0,
                weight=1.0,
                status="approved",
                tenant=a.tenant,
                segment=a.segment,
                user_id=who.user_id,
                key_id=who.key_id,
                author_role=who.role,
                created_at=who.at,
                message_id=a.message_id,
                completion_id=a.completion_id,
                adapter_version=a.adapter_version,
                sampling=a.sampling,
                feedback_ids=tuple(sorted(v.feedback_id for v in label.voters if v.feedback_id)),
                parent_id=a.parent_id,
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Steps 5-9: gates over materialised items (pairs and KTO rows alike)

Item = TypeVar("Item", PreferencePair, UnpairedExample)


def _answers_of(item: PreferencePair | UnpairedExample) -> tuple[str, ...]:
    if isinstance(item, PreferencePair):
        return (item.chosen, item.rejected)
    return (item.completion,)


def _redacted(item: Item, counts: Counter[str]) -> Item:
    def clean(text: str) -> str:
        new, found = redact(text)
        counts.update(found)
        return new

    prompt = tuple(ChatMessage(m.role, clean(m.content)) for m in item.prompt)
    if isinstance(item, PreferencePair):
        return replace(
            item, prompt=prompt, chosen=clean(item.chosen), rejected=clean(item.rejected)
        )
    return replace(item, prompt=prompt, completion=clean(item.completion))


def _normalise_ws(text: str) -> str:
    return " ".join(text.split())


def _content_problem(item: PreferencePair | UnpairedExample, config: GateConfig) -> str | None:
    if not item.prompt or item.prompt[-1].role != "user":
        return DropReason.PROMPT_NOT_USER_LAST
    if sum(len(m.content) for m in item.prompt) > config.max_prompt_chars:
        return DropReason.PROMPT_TOO_LONG
    texts = [t.strip() for t in _answers_of(item)]
    if any(not t for t in texts):
        return DropReason.EMPTY
    if any(len(t) < config.min_answer_chars for t in texts):
        return DropReason.TOO_SHORT
    if any(len(t) > config.max_answer_chars for t in texts):
        return DropReason.TOO_LONG
    if isinstance(item, PreferencePair) and _normalise_ws(item.chosen) == _normalise_ws(
        item.rejected
    ):
        return DropReason.IDENTICAL
    return None


_WORD_RE = re.compile(r"\w+")


def prompt_tokens(prompt: Sequence[ChatMessage]) -> frozenset[str]:
    """Lower-cased word set of the conversation's non-system turns.

    System messages are left out: a tenant's long fixed system prompt would otherwise make every
    conversation of that tenant look alike.
    """
    text = " ".join(m.content for m in prompt if m.role != "system")
    return frozenset(_WORD_RE.findall(text.casefold()))


def _prefix_len(size: int, threshold: float) -> int:
    # Prefix filtering (Bayardo et al., "Scaling up all pairs similarity search", 2007): two sets
    # with Jaccard >= t share a token among the first |s| - ceil(t*|s|) + 1 of each, under any
    # fixed global token order. Rare tokens first keeps candidate lists short.
    return size - math.ceil(threshold * size - 1e-9) + 1


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _newest_first(items: Iterable[Item]) -> list[Item]:
    return sorted(items, key=lambda x: (x.created_at, x.key), reverse=True)


def _cap_prompt_clusters(
    items: Sequence[Item], threshold: float, max_per_cluster: int
) -> tuple[list[Item], list[Item]]:
    """Greedy leader clustering per tenant, newest first: an item joins the most similar leader
    (Jaccard >= threshold) or leads a new cluster; each cluster keeps its first `max_per_cluster`
    items, i.e. the newest. Cost grows with how many leaders share a prompt's rarest tokens:
    about 1 s per 10k ordinary chat prompts; 8 s for 5k prompts of 30 words drawn uniformly from
    a 200-word vocabulary (a worst case: no rare words)."""
    tokens = {x.key: prompt_tokens(x.prompt) for x in items}
    freq = Counter(t for toks in tokens.values() for t in toks)

    def ordered(toks: frozenset[str]) -> list[str]:
        return sorted(toks, key=lambda t: (freq[t], t))

    kept: list[Item] = []
    dropped: list[Item] = []
    by_tenant: dict[str, list[Item]] = defaultdict(list)
    for x in items:
        by_tenant[x.tenant].append(x)
    for tenant in sorted(by_tenant):
        leaders: list[frozenset[str]] = []
        sizes: list[int] = []
        index: dict[str, list[int]] = defaultdict(list)  # prefix token → leader numbers
        for x in _newest_first(by_tenant[tenant]):
            toks = tokens[x.key]
            prefix = ordered(toks)[: _prefix_len(len(toks), threshold)] or [""]
            candidates = sorted({i for t in prefix for i in index.get(t, ())})
            scored = [(_jaccard(toks, leaders[i]), -i) for i in candidates]
            best = max((s for s in scored if s[0] >= threshold), default=None)
            if best is None:
                leaders.append(toks)
                sizes.append(0)
                for t in prefix:
                    index[t].append(len(leaders) - 1)
                cluster = len(leaders) - 1
            else:
                cluster = -best[1]
            if sizes[cluster] < max_per_cluster:
                sizes[cluster] += 1
                kept.append(x)
            else:
                dropped.append(x)
    return kept, dropped


def _user_cap(n_exempt: int, counts: Sequence[int], share: float) -> int:
    """Largest per-user count c with c <= share * (n_exempt + sum(min(n, c))).

    g(c) = share * (n_exempt + sum(min(n, c))) - c is concave with g(0) >= 0, so the feasible c
    form an interval [0, c*] and bisection finds c*. Capping at share * len(input) instead would
    not do: after dropping a flood, the flooder's share of the smaller batch is still too high.
    """
    lo, hi = 0, max(counts, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid <= share * (n_exempt + sum(min(n, mid) for n in counts)) + 1e-9:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _cap_users(
    items: Sequence[Item],
    config: GateConfig,
    group: Callable[[Item], str] = lambda x: x.user_id,
    share: float | None = None,
) -> tuple[list[Item], list[Item]]:
    """No `group` (a user; or an API key) owns more than `share` of the kept items."""
    share = config.max_user_share if share is None else share
    if len(items) < config.min_batch_for_cap:
        return list(items), []

    def exempt(x: Item) -> bool:
        return (x.author_role == "operator" and not config.cap_operators) or not group(x)

    by_user: dict[str, list[Item]] = defaultdict(list)
    for x in items:
        if not exempt(x):
            by_user[group(x)].append(x)
    n_exempt = len(items) - sum(len(v) for v in by_user.values())
    cap = _user_cap(n_exempt, [len(v) for v in by_user.values()], share)

    def rank(xs: list[Item]) -> list[Item]:
        if config.cap_keep == "newest":
            return _newest_first(xs)
        # A seeded hash of the key: random-looking, yet independent of input order.
        return sorted(xs, key=lambda x: hashlib.sha256(f"{config.seed}:{x.key}".encode()).digest())

    dropped: set[str] = set()
    for xs in by_user.values():
        dropped.update(x.key for x in rank(xs)[cap:])
    return [x for x in items if x.key not in dropped], [x for x in items if x.key in dropped]


def _status(tenant: str, config: GateConfig) -> Status:
    return "pending" if config.require_approval or tenant in config.approval_tenants else "approved"


def _gate(
    items: Iterable[Item],
    config: GateConfig,
    known_keys: Collection[str],
    drops: Counter[str],
    redactions: Counter[str],
    trust: Mapping[str, float] | None = None,
) -> tuple[tuple[Item, ...], tuple[Item, ...]]:
    """Steps 4-9 → (accepted, excluded). Excluded items are returned, not just counted, so the
    service can store them as "excluded": their keys then come back as `known_keys`, and a pair
    the batch gates turned down (a flood over the user cap, a near-duplicate) stays down instead of
    slipping into the next batch once the ones that beat it are known."""
    accepted: list[Item] = []
    excluded: list[Item] = []

    def exclude(xs: Iterable[Item], reason: str) -> None:
        for x in xs:
            drops[reason] += 1
            excluded.append(replace(x, status="excluded", excluded_reason=str(reason)))

    for x in items:
        if x.key in known_keys:
            drops[DropReason.ALREADY_KNOWN] += 1
            continue
        if config.redact_pii:
            x = _redacted(x, redactions)
        problem = _content_problem(x, config)
        if problem is not None:
            exclude([x], problem)
        else:
            accepted.append(x)
    if config.near_dup_threshold is not None:
        accepted, near_dups = _cap_prompt_clusters(
            accepted, config.near_dup_threshold, config.max_per_prompt_cluster
        )
        exclude(near_dups, DropReason.NEAR_DUPLICATE_PROMPT)
    if trust is not None:
        low = [x for x in accepted if trust.get(x.user_id, 1.0) < config.min_rater_trust]
        accepted = [x for x in accepted if trust.get(x.user_id, 1.0) >= config.min_rater_trust]
        exclude(low, DropReason.LOW_TRUST)
        accepted = [replace(x, weight=x.weight * trust.get(x.user_id, 1.0)) for x in accepted]
    # Each cap shrinks the batch, which can push another group over its share: repeat until
    # a pass drops nothing, and then both hold (items only go, so this ends).
    while True:
        accepted, by_user = _cap_users(accepted, config)
        exclude(by_user, DropReason.USER_CAP)
        by_key: list[Item] = []
        if config.max_key_share < 1.0:
            accepted, by_key = _cap_users(
                accepted, config, group=lambda x: x.key_id, share=config.max_key_share
            )
            exclude(by_key, DropReason.KEY_CAP)
        if not by_user and not by_key:
            break
    accepted = [replace(x, status=_status(x.tenant, config)) for x in accepted]
    if config.review_links:
        accepted = [_hold_links(x, drops) for x in accepted]

    def in_order(xs: list[Item]) -> tuple[Item, ...]:
        return tuple(sorted(xs, key=lambda x: (x.created_at, x.key)))

    return in_order(accepted), in_order(excluded)


_LINK_RE = re.compile(
    r"(?i)(?:\b(?:https?://|www\.)[^\s<>()\"']+"
    r"|\b(?:[a-z0-9-]+\.)+(?:com|net|org|info|biz|io|co|me|ru|cn|xyz|top|shop|site|online|"
    r"click|link|app|example)\b(?:/[^\s<>()\"']*)?)"
)


def links(text: str) -> frozenset[str]:
    """Links in a text (URLs, `www.` names, and bare domains under common top-level domains),
    lower-cased, without scheme, `www.` or trailing punctuation."""
    found = set()
    for m in _LINK_RE.finditer(text):
        link = re.sub(r"^(?:https?://)?(?:www\.)?", "", m.group(0).lower()).rstrip(".,;:!?")
        found.add(link.rstrip("/"))
    return frozenset(found)


def _hold_links(x: Item, drops: Counter[str]) -> Item:
    preferred = x.chosen if isinstance(x, PreferencePair) else (x.completion if x.label else "")
    found = links(preferred)
    if not found:
        return x
    drops[DropReason.HELD_LINK] += 1
    reason = f"{DropReason.HELD_LINK}: {', '.join(sorted(found))}"[:200]
    return replace(x, status="pending", excluded_reason=reason)


# ---------------------------------------------------------------------------------------------
# Rater trust


def rater_trust(thumbs: Sequence[Feedback], picks: Sequence[Feedback]) -> dict[str, float]:
    """Each user's agreement with the consensus, (1 + agreed) / (1 + judged), over the items
    several users judged: an answer with thumbs from two or more users, or a pair of answers
    picked between by two or more. The consensus is the side more users took (ties: no
    consensus, the item does not count). A user who never judged a contested item has trust 1;
    one who sided against the majority on every one of n contested items, 1 / (1 + n).
    Operators are trusted (they are not in the result). Each user's latest vote counts."""
    by_item: dict[Any, dict[str, Any]] = defaultdict(dict)
    for f in sorted(thumbs, key=lambda f: (f.created_at, f.id)):
        if f.author_role == "user":
            by_item[("thumbs", f.message_id)][f.user_id] = f.value
    for f in sorted(picks, key=lambda f: (f.created_at, f.id)):
        if f.author_role == "user" and f.other_message_id is not None:
            pair = ("pick", *sorted((f.message_id, f.other_message_id)))
            by_item[pair][f.user_id] = f.message_id
    agreed: Counter[str] = Counter()
    judged: Counter[str] = Counter()
    for votes in by_item.values():
        if len(votes) < 2:
            continue
        sides = Counter(votes.values()).most_common()
        if len(sides) > 1 and sides[0][1] == sides[1][1]:
            continue  # a tie: no consensus
        majority = sides[0][0]
        for user, side in votes.items():
            judged[user] += 1
            agreed[user] += side == majority
    return {u: (1 + agreed[u]) / (1 + judged[u]) for u in judged}


# ---------------------------------------------------------------------------------------------
# The compiler


def _valid(f: Feedback) -> bool:
    if f.kind == "thumbs":
        return f.value in (1, -1)
    if f.kind == "pick":
        return f.other_message_id is not None and f.other_message_id != f.message_id
    if f.kind == "edit":
        return bool(f.text and f.text.strip())
    return False


def _index(rows: Iterable[Any], id_of: Any, what: str) -> dict[str, Any]:
    """Rows by id; repeated identical rows collapse, different rows under one id are a bug
    upstream (and would make the result depend on input order)."""
    index: dict[str, Any] = {}
    for row in rows:
        if id_of(row) in index and index[id_of(row)] != row:
            raise ValueError(f"two different {what} share the id {id_of(row)!r}")
        index[id_of(row)] = row
    return index


def compile_pairs(
    answers: Iterable[Answer],
    feedback: Iterable[Feedback],
    config: GateConfig | None = None,
    *,
    known_keys: Collection[str] = frozenset(),
) -> CompileResult:
    """Compile stored answers and feedback into gated DPO pairs and KTO rows.

    Call it once per training batch (the user cap is a share of what it returns). Pass the keys
    already stored as `known_keys` to get only new items. The result does not depend on the order
    of `answers` or `feedback`.
    """
    config = config or GateConfig()
    drops: Counter[str] = Counter()
    by_id = dict(sorted(_index(answers, lambda a: a.message_id, "answers").items()))
    rows = sorted(
        _index(feedback, lambda f: f.id, "feedback rows").values(),
        key=lambda f: (f.created_at, f.id),
    )

    usable: dict[str, list[Feedback]] = defaultdict(list)
    for f in rows:
        if not _valid(f):
            drops[DropReason.INVALID_FEEDBACK] += 1
        elif f.message_id not in by_id:
            drops[DropReason.UNKNOWN_MESSAGE] += 1
        else:
            usable[f.kind].append(f)

    labels = _resolve_thumbs(usable["thumbs"], config.conflict_policy, drops)
    siblings = _siblings(by_id)
    votes = (
        _regenerate_votes(siblings, labels)
        + _thumbs_votes(siblings, labels)
        + _pick_votes(usable["pick"], by_id, drops)
    )
    edits = _edit_pairs(usable["edit"], by_id, config, drops)
    # An answer in any candidate pair (even one dropped as contested) is not "lone": its thumbs
    # already spoke in a pair, and a KTO row would count the same vote twice.
    paired = {m for v in votes for m in (v.chosen_id, v.rejected_id)}
    paired |= {e.rejected_message_id for e in edits}
    pairs = [
        p
        for v in _settle(votes, config.conflict_policy, drops)
        if (p := _pair_from_vote(v, by_id, drops)) is not None
    ] + edits
    unpaired = _unpaired(labels, by_id, paired) if config.emit_unpaired else []

    redactions: Counter[str] = Counter()
    trust = rater_trust(usable["thumbs"], usable["pick"]) if config.rater_trust else None
    pairs_ok, pairs_excluded = _gate(pairs, config, known_keys, drops, redactions, trust)
    unpaired_ok, unpaired_excluded = _gate(unpaired, config, known_keys, drops, redactions, trust)
    return CompileResult(
        pairs=pairs_ok,
        unpaired=unpaired_ok,
        excluded=pairs_excluded + unpaired_excluded,
        dropped=Counter({str(reason): n for reason, n in drops.items() if n}),
        redactions=redactions,
    )


# ---------------------------------------------------------------------------------------------
# Matched pairs from lone thumbs


def _question(x: UnpairedExample) -> tuple[str, ...]:
    """What makes two answers comparable: scope, adapter version and the whole conversation
    before them, system prompt included, compared case- and whitespace-insensitively."""
    turns = tuple(f"{m.role}:{_normalise_ws(m.content).casefold()}" for m in x.prompt)
    return (x.tenant, x.segment, x.adapter_version, *turns)


def _matchable(up: UnpairedExample, down: UnpairedExample, window_hours: float) -> bool:
    return (
        up.completion_id != down.completion_id  # two choices of one completion: one visitor
        and not (up.parent_id and up.parent_id == down.parent_id)  # one conversation's turn
        and up.user_id != down.user_id  # one user rating both compared nothing
        and abs((up.created_at - down.created_at).total_seconds()) <= window_hours * 3600
        and _normalise_ws(up.completion) != _normalise_ws(down.completion)
    )


def match_thumbs(
    rows: Sequence[UnpairedExample], window_hours: float | None
) -> tuple[list[PreferencePair], list[UnpairedExample]]:
    """Lone thumbs → (matched pairs, the rows left unpaired).

    An up and a down become a pair (source "matched", chosen = the up) when they answer the same
    question: same tenant, segment and adapter version (both answers came from one policy), and
    the same conversation before the answer, system prompt included, compared case- and
    whitespace-insensitively; from different conversations (a regenerated or `n>1` sibling is
    the compiler's business), rated by different users, at most `window_hours` apart, with
    different texts. Each row joins at most one pair, the nearest in time first (ties by key, so
    the result does not depend on input order). The pair keeps both rows' feedback ids and
    weighs the smaller of their weights. `window_hours` None: no matching.
    """
    if window_hours is None:
        return [], list(rows)
    groups: dict[tuple[str, ...], list[UnpairedExample]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r.key):
        groups[_question(r)].append(r)
    pairs: list[PreferencePair] = []
    used: set[str] = set()
    for members in groups.values():
        ups = [r for r in members if r.label]
        downs = [r for r in members if not r.label]
        candidates = sorted(
            (abs((u.created_at - d.created_at).total_seconds()), u.key, d.key, u, d)
            for u in ups
            for d in downs
            if _matchable(u, d, window_hours)
        )
        for _, _, _, up, down in candidates:
            if up.key not in used and down.key not in used:
                used |= {up.key, down.key}
                pairs.append(_matched_pair(up, down))
    return pairs, [r for r in rows if r.key not in used]


def _matched_pair(up: UnpairedExample, down: UnpairedExample) -> PreferencePair:
    newest = max(up, down, key=lambda r: (r.created_at, r.key))
    return PreferencePair(
        key=_key("matched", up.key, down.key),
        source="matched",
        prompt=up.prompt,
        chosen=up.completion,
        rejected=down.completion,
        weight=min(up.weight, down.weight),
        status=newest.status,
        tenant=up.tenant,
        segment=up.segment,
        user_id=newest.user_id,
        key_id=newest.key_id,
        author_role=newest.author_role,
        created_at=newest.created_at,
        chosen_message_id=up.message_id,
        rejected_message_id=down.message_id,
        chosen_completion_id=up.completion_id,
        rejected_completion_id=down.completion_id,
        chosen_adapter_version=up.adapter_version,
        rejected_adapter_version=down.adapter_version,
        chosen_sampling=up.sampling,
        rejected_sampling=down.sampling,
        feedback_ids=tuple(sorted({*up.feedback_ids, *down.feedback_ids})),
    )


# ---------------------------------------------------------------------------------------------
# Export: TRL conversational rows and JSONL


def _json(value: Any) -> str:
    # Nested provenance goes out as a JSON string: Arrow needs one type per column, and a dict
    # column whose keys vary by row (or is empty in some rows) would not give one.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def dpo_row(pair: PreferencePair) -> dict[str, Any]:
    """TRL's conversational preference format plus flat provenance columns (strings / numbers;
    missing ids are "" rather than null so every column has one type in every row)."""
    return {
        "prompt": [m.as_dict() for m in pair.prompt],
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
        "key": pair.key,
        "source": pair.source,
        "weight": float(pair.weight),
        "status": pair.status,
        "tenant": pair.tenant,
        "segment": pair.segment,
        "user_id": pair.user_id,
        "author_role": pair.author_role,
        "created_at": pair.created_at.isoformat(),
        "chosen_message_id": pair.chosen_message_id or "",
        "rejected_message_id": pair.rejected_message_id,
        "chosen_completion_id": pair.chosen_completion_id or "",
        "rejected_completion_id": pair.rejected_completion_id,
        "chosen_adapter_version": pair.chosen_adapter_version or "",
        "rejected_adapter_version": pair.rejected_adapter_version,
        "chosen_sampling": _json(dict(pair.chosen_sampling)),
        "rejected_sampling": _json(dict(pair.rejected_sampling)),
        "feedback_ids": _json(list(pair.feedback_ids)),
    }


def kto_row(example: UnpairedExample) -> dict[str, Any]:
    """TRL's conversational unpaired-preference (KTO) format plus flat provenance columns."""
    return {
        "prompt": [m.as_dict() for m in example.prompt],
        "completion": [{"role": "assistant", "content": example.completion}],
        "label": bool(example.label),
        "key": example.key,
        "source": example.source,
        "weight": float(example.weight),
        "status": example.status,
        "tenant": example.tenant,
        "segment": example.segment,
        "user_id": example.user_id,
        "author_role": example.author_role,
        "created_at": example.created_at.isoformat(),
        "message_id": example.message_id,
        "completion_id": example.completion_id,
        "adapter_version": example.adapter_version,
        "sampling": _json(dict(example.sampling)),
        "feedback_ids": _json(list(example.feedback_ids)),
    }


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> int:
    """Write one JSON object per line, atomically: readers see the old file or the whole new one,
    never a half-written one (temp file in the same directory, fsync, rename). Returns the count.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
