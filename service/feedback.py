"""Feedback: one signal in, one committed row out; and every stored signal read back as the
pair compiler's records.

The route awaits `submit_feedback`, which hands the write to the group-commit thread and returns
after the commit. Each signal is one write in a shared transaction: look up the idempotency
key, check the completion, upsert the user's slot (`service.storage.feedback`).

`load_signals` is the way back: the stored answers that have signals (feedback, or a kept
regeneration) together with their siblings, as `trainer.records` records. `compile_and_store` is
the compile step the operator API, the CLI and the scheduler call: it runs the compiler
(`trainer.votes.compile_pairs`) on them with every stored key as `known_keys`, and stores what
comes back — accepted items as approved/pending, gate-excluded ones as excluded, so their keys
stay known. Re-running it stores nothing twice.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Row
from sqlalchemy.engine import Engine as Database
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from adapters.registry import as_utc
from service import observability
from service.core.config import Settings
from service.core.errors import ConflictError, NotFoundError
from service.core.identity import Principal
from service.privacy import tombstoned
from service.storage import feedback as stored
from service.storage.db import GroupCommit, session_scope
from service.storage.tables import (
    Completion,
    Feedback,
    Message,
    OperatorAction,
    PreferencePair,
    utcnow,
)
from service.storage.turns import path_to
from trainer import quality, records, votes


@dataclass(frozen=True)
class Author:
    """Who is sending feedback: a user, or an operator (writing ideal answers)."""

    role: str  # user|operator
    name: str | None  # the operator's name; users name themselves with the `user` field
    caller: Principal


@dataclass(frozen=True)
class Signal:
    """One feedback signal, as the client sent it."""

    kind: str  # thumbs | pick | edit
    completion_id: str
    choice_index: int  # thumbs, edit: the rated choice; pick: the chosen one
    value: int  # thumbs: ±1; pick: the chosen index; edit: 0
    user: str | None = None
    comment: str | None = None
    text: str | None = None  # edit: the ideal answer
    request: dict[str, Any] = field(default_factory=dict)  # the body: tells a retry apart


class _CompletionCache:
    """Succeeded completions never change, and feedback on one tends to come in bursts (a
    popular answer, an A/B test): keep the last few thousand and skip two reads per write."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.items: OrderedDict[tuple[str, str], stored.RatedCompletion] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, db: Database, session: object, completion_id: str) -> stored.RatedCompletion:
        key = (str(db.url), completion_id)
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
                return hit
        found = stored.rated_completion(session, completion_id=completion_id)  # type: ignore[arg-type]
        if found.status == "succeeded":
            with self.lock:
                self.items[key] = found
                if len(self.items) > self.size:
                    self.items.popitem(last=False)
        return found


_completions = _CompletionCache()


async def submit_feedback(
    writer: GroupCommit, signal: Signal, author: Author, idempotency_key: str | None
) -> tuple[Feedback | Row, bool]:
    """Store one signal; returns (the stored feedback, whether this was a replayed retry).

    Returns only after the group transaction holding the write has committed.
    """
    caller = author.caller
    digest = stored.request_hash(
        {"body": signal.request, "author": author.role, "by": author.name, "key": caller.key_id}
    )

    def write(session: Session) -> tuple[Feedback | Row, bool]:
        if idempotency_key is not None:
            earlier = stored.feedback_by_idempotency_key(
                session, key=idempotency_key, request_hash=digest
            )
            if earlier is not None:
                return earlier, True
        completion = _completions.get(writer.engine, session, signal.completion_id)
        if not caller.owns(completion.key_id, completion.tenant, completion.user_id):
            # Another key's completion is, to this caller, one that does not exist.
            raise NotFoundError(
                f"completion {signal.completion_id!r} not found", param="completion_id"
            )
        row = stored.record_feedback(
            session,
            kind=signal.kind,
            completion=completion,
            key_id=caller.key_id,
            choice_index=signal.choice_index,
            value=signal.value,
            # A widget visitor is who the server says, whatever `user` the body names.
            user_id=caller.visitor_user or signal.user or author.name,
            author_role=author.role,
            comment=signal.comment,
            edited_text=signal.text,
            idempotency_key=idempotency_key,
            request_hash=digest,
        )
        return row, False

    for attempt in range(2):
        try:
            row, replayed = await writer.write(write)
        except IntegrityError:
            # Another process's first write with the same Idempotency-Key won the race; the
            # retry sees its row and replays it (or answers 409).
            if attempt == 1:
                raise
            continue
        if not replayed:
            observability.FEEDBACK.labels(signal.kind).inc()
        return row, replayed
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Read back for the pair compiler

# Tool use as text, the way Hermes-style chat templates write it (and vLLM's `hermes` tool
# parser reads it back): the trainer renders plain (role, content) turns with the base model's
# own template, so a pair keeps the tools, calls and results it was answered with, and an
# adapter trained on it learns to write calls the vLLM engine parses.
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def message_text(m: Message) -> str:
    """A stored message's content with its tool calls written out as text."""
    parts = [m.content] if m.content else []
    for call in m.tool_calls or ():
        fn = call.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:  # the model's arguments need not parse: keep them as written
            args = fn.get("arguments")
        parts.append(
            "<tool_call>\n"
            + json.dumps({"name": fn.get("name"), "arguments": args})
            + "\n</tool_call>"
        )
    return "\n".join(parts)


def prompt_messages(path: list[Message], tools: dict[str, Any] | None) -> list[dict[str, str]]:
    """A stored prompt as (role, content) turns: the offered tools in the system turn, a tool
    result as a user turn (so the prompt still ends with a user turn), calls as text."""
    out = []
    for m in path:
        if m.role == "tool":
            out.append(
                {"role": "user", "content": f"<tool_response>\n{m.content}\n</tool_response>"}
            )
        else:
            out.append({"role": m.role, "content": message_text(m)})
    offered = (tools or {}).get("tools")
    if offered:
        preamble = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t) for t in offered))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{preamble}"}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def load_signals(session: Session) -> tuple[list[records.Answer], list[records.Feedback]]:
    """Every feedback row, and every answer that shares a parent with a rated, picked, edited or
    kept answer (its siblings are what the signal is relative to). Deleted users' signals are
    left out (`service.privacy`): their later feedback and kept answers never train a model."""
    signals = stored.stored_signals(session)
    answers = [
        _answer(message, completion, signals.tenants, signals.trees)
        for message, completion in signals.answers
    ]
    feedback = [_vote(f) for f in signals.feedback]
    gone = tombstoned(session)
    if gone:
        tenant_of = {a.message_id: a.tenant for a in answers}
        feedback = [f for f in feedback if (tenant_of.get(f.message_id, ""), f.user_id) not in gone]
        # A deleted user's kept answer is no signal; the answer stays as another voter's sibling.
        answers = [replace(a, kept=False) if (a.tenant, a.user_id) in gone else a for a in answers]
    return answers, feedback


def _served_by(message: Message, completion: Completion) -> str | None:
    """The version that wrote an answer: a head-to-head turn's choices come from two (each
    message says which); any other turn's from its completion's."""
    return message.adapter_version if completion.experiment_id else completion.adapter_version


def _answer(
    message: Message,
    completion: Completion,
    tenants: dict[str, str],
    trees: dict[str, dict[str, Message]],
) -> records.Answer:
    path = path_to(trees[completion.conversation_id], completion.parent_message_id)
    return records.Answer(
        message_id=message.id,
        completion_id=completion.id,
        parent_id=completion.parent_message_id,
        prompt=prompt_messages(path, completion.tools),
        text=message_text(message),
        tenant=tenants[completion.conversation_id],
        segment=completion.segment,
        user_id=completion.user_id or "anonymous",
        created_at=as_utc(message.created_at),
        choice_index=message.choice_index or 0,
        adapter_version=_served_by(message, completion) or "",
        sampling=completion.params,
        kept=message.kept_at is not None,
        regenerated_from=completion.regenerated_from,
        key_id=completion.key_id or "",
    )


def _vote(f: Feedback) -> records.Feedback:
    return records.Feedback(
        id=f.id,
        message_id=f.message_id,
        user_id=f.user_id,
        kind=f.kind,  # type: ignore[arg-type]
        created_at=as_utc(f.updated_at),  # the time of the current vote
        value=f.value if f.kind == "thumbs" else 0,
        other_message_id=f.other_message_id,
        text=f.edited_text,
        comment=f.comment,
        author_role=f.author_role,  # type: ignore[arg-type]
        key_id=f.key_id or "",
    )


# --- compiled into pairs ------------------------------------------------------------------------


@dataclass(frozen=True)
class CompileSummary:
    """What one compile stored, and what it looked at."""

    stored: dict[str, int]  # by status: approved / pending / excluded
    pairs: int  # new DPO pairs accepted
    unpaired: int  # new KTO rows accepted
    excluded: int
    dropped: dict[str, int]  # DropReason -> count
    redactions: dict[str, int]
    answers: int  # answers considered
    feedback: int  # feedback rows considered


def gate_config(settings: Settings) -> quality.GateConfig:
    return quality.GateConfig(
        max_user_share=settings.pairs_max_user_share,
        min_batch_for_cap=settings.pairs_min_batch_for_cap,
        require_approval=settings.pairs_require_approval,
        near_dup_threshold=settings.pairs_near_dup_threshold or None,
        min_answer_chars=settings.pairs_min_answer_chars,
        max_answer_chars=settings.pairs_max_answer_chars,
        edit_weight=settings.pairs_edit_weight,
        max_key_share=settings.pairs_max_key_share,
        rater_trust=settings.pairs_rater_trust,
        min_rater_trust=settings.pairs_min_rater_trust,
        review_links=settings.pairs_review_links,
    )


def _row(item: records.PreferencePair | records.UnpairedExample, now: datetime) -> PreferencePair:
    common = dict(
        key=item.key,
        tenant=item.tenant,
        segment=item.segment,
        prompt=[m.as_dict() for m in item.prompt],
        source=item.source,
        weight=item.weight,
        status=item.status,
        excluded_reason=item.excluded_reason or None,
        created_at=now,
        updated_at=now,
    )
    signal = {
        "user_id": item.user_id,
        "key_id": item.key_id,
        "author_role": item.author_role,
        "signal_at": item.created_at.isoformat(),
        "feedback_ids": list(item.feedback_ids),
    }
    if isinstance(item, records.UnpairedExample):
        return PreferencePair(
            kind="unpaired",
            chosen=item.completion,
            label=item.label,
            provenance=signal
            | {
                "message_id": item.message_id,
                "completion_id": item.completion_id,
                "adapter_version": item.adapter_version,
                "sampling": dict(item.sampling),
                "parent_id": item.parent_id,
            },
            **common,
        )
    return PreferencePair(
        kind="pair",
        chosen=item.chosen,
        rejected=item.rejected,
        provenance=signal
        | {
            "chosen_message_id": item.chosen_message_id,
            "rejected_message_id": item.rejected_message_id,
            "chosen_completion_id": item.chosen_completion_id,
            "rejected_completion_id": item.rejected_completion_id,
            "chosen_adapter_version": item.chosen_adapter_version,
            "rejected_adapter_version": item.rejected_adapter_version,
            "chosen_sampling": dict(item.chosen_sampling),
            "rejected_sampling": dict(item.rejected_sampling),
        },
        **common,
    )


def compile_and_store(
    db: Database, settings: Settings, *, actor: str = "system", tenant: str | None = None
) -> CompileSummary:
    """Compile new pairs from every stored signal and store them; returns the counts.
    ``tenant``: only that tenant's signals (an operator's compile: its counts say nothing
    about other tenants).

    Reads and the compiler run outside the write transaction; the write is one transaction, and
    the unique `key` keeps a concurrent compile from storing an item twice (it gets a 409).
    """
    with Session(db) as session:
        answers, feedback = load_signals(session)
        known = set(session.exec(select(PreferencePair.key)).all())
    if tenant is not None:
        answers = [a for a in answers if a.tenant == tenant]
        mine = {a.message_id for a in answers}
        feedback = [f for f in feedback if f.message_id in mine]
    result = votes.compile_pairs(answers, feedback, gate_config(settings), known_keys=known)

    now = utcnow()
    items = [*result.pairs, *result.unpaired, *result.excluded]
    rows = [_row(item, now) for item in items]
    stored = Counter(r.status for r in rows)
    summary = CompileSummary(
        stored=dict(stored),
        pairs=len(result.pairs),
        unpaired=len(result.unpaired),
        excluded=len(result.excluded),
        dropped=dict(result.dropped),
        redactions=dict(result.redactions),
        answers=len(answers),
        feedback=len(feedback),
    )
    try:
        with session_scope(db) as session:
            session.add_all(rows)
            session.add(
                OperatorAction(
                    actor=actor,
                    action="compile",
                    target_ids=[r.id for r in rows],
                    detail=asdict(summary),
                )
            )
    except IntegrityError as exc:
        raise ConflictError(
            "another compile stored some of these pairs at the same time; run it again",
            code="compile_conflict",
        ) from exc
    return summary
