"""The records of feedback compiling: what goes in, what comes out, and how it is written.

In: `Answer` (one stored assistant message) and `Feedback` (one thumbs, pick or edit row), which
the service builds from its tables. Out: `PreferencePair` (a DPO triplet), `UnpairedExample`
(a KTO row: one answer and its thumbs label) and `CompileResult`, with every drop counted
under a `DropReason`. Each item carries a content key (`dpo_pair_key` & co.): the same signal
always gets the same key, so stored keys make a re-run add nothing new.

Out to the trainer: `dpo_row` / `kto_row` give TRL's conversational formats with flat
provenance columns, and `write_jsonl` writes them atomically.

Pure Python, no torch and no `service` import.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

Source = Literal["regenerate", "thumbs", "pick", "edit", "matched"]
Status = Literal["pending", "approved", "excluded"]
Role = Literal["user", "operator"]

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


def matched_pair_key(up_key: str, down_key: str) -> str:
    """Key of a pair matched from two lone thumbs rows (`trainer.votes.match_thumbs`)."""
    return _key("matched", up_key, down_key)


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
