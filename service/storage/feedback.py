"""Stored feedback: one upserted row per signal slot (a later vote replaces the earlier one),
and the stored answers and votes read back for the pair compiler. Plain functions over a
session, keyword-only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Insert, Row
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from service.core.errors import ConflictError, InvalidRequestError, NotFoundError
from service.storage.tables import Completion, Conversation, Feedback, Message, new_id, utcnow


def request_hash(payload: dict[str, Any]) -> str:
    """A stable hash of a request body, to tell a retry from a different request under one key."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def feedback_by_idempotency_key(
    session: Session, *, key: str, request_hash: str
) -> Feedback | None:
    """The feedback an earlier request with this key stored, or None. The same key with a
    different body is a client bug: 409 rather than a silent second write."""
    row = session.exec(select(Feedback).where(Feedback.idempotency_key == key)).first()
    if row is not None and row.request_hash != request_hash:
        raise ConflictError(
            "this Idempotency-Key was already used with a different request body; use a new "
            "key for a new request",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return row


@dataclass(frozen=True)
class RatedCompletion:
    """What feedback needs to know about a completion. Immutable once `succeeded`, so callers
    may cache it."""

    id: str
    status: str
    user_id: str | None
    answer_ids: tuple[str, ...]  # by choice index
    key_id: str | None = None  # who asked: the owner
    tenant: str = "default"


def rated_completion(session: Session, *, completion_id: str) -> RatedCompletion:
    rows = session.exec(
        select(
            Completion.status,
            Completion.user_id,
            Message.id,
            Completion.key_id,
            Conversation.tenant,
        )
        .join(Conversation, col(Conversation.id) == Completion.conversation_id)
        .outerjoin(Message, col(Message.completion_id) == Completion.id)
        .where(Completion.id == completion_id)
        .order_by(col(Message.choice_index))
    ).all()
    if not rows:
        raise NotFoundError(f"completion {completion_id!r} not found", param="completion_id")
    status, user_id, key_id, tenant = rows[0][0], rows[0][1], rows[0][3], rows[0][4]
    return RatedCompletion(
        completion_id, status, user_id, tuple(r[2] for r in rows if r[2]), key_id, tenant
    )


_FEEDBACK = Feedback.__table__
_SLOT = ("user_id", "kind", "target")
_KEEP_ON_UPDATE = ("id", "created_at", *_SLOT)


@cache
def _upsert(dialect: str) -> Insert:
    """INSERT ... ON CONFLICT (slot) DO UPDATE ... RETURNING the stored row, built once.

    One Core statement instead of the ORM's SELECT, INSERT or UPDATE and unit of work: feedback
    is the busiest write, and the ORM spent more CPU on it than SQLite did. The conflict clause
    makes "a later vote replaces the earlier one" atomic, even against another process.
    """
    insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[dialect]
    stmt = insert(_FEEDBACK)
    return stmt.on_conflict_do_update(
        index_elements=list(_SLOT),
        set_={c.name: stmt.excluded[c.name] for c in _FEEDBACK.c if c.name not in _KEEP_ON_UPDATE},
    ).returning(*_FEEDBACK.c)


def _slot(kind: str, completion: RatedCompletion, choice_index: int) -> tuple[str, str | None]:
    """What a signal addresses (its slot's `target`) and, for a pick, the answer not chosen;
    refuses a signal the completion cannot take."""
    completion_id, answers = completion.id, completion.answer_ids
    if completion.status != "succeeded":
        raise ConflictError(
            f"completion {completion_id!r} is {completion.status}; feedback needs an answer",
            param="completion_id",
            code="completion_not_succeeded",
        )
    if kind == "pick":
        if len(answers) != 2:
            raise InvalidRequestError(
                f"a pick needs a response with n=2 choices; {completion_id!r} has {len(answers)}",
                param="completion_id",
            )
        if choice_index not in (0, 1):
            raise InvalidRequestError(
                f"chosen_index is {choice_index}; it must be 0 or 1", param="chosen_index"
            )
        return completion_id, answers[1 - choice_index]
    if choice_index >= len(answers):
        raise InvalidRequestError(
            f"choice_index is {choice_index}; completion {completion_id!r} has "
            f"{len(answers)} choice(s)",
            param="choice_index",
        )
    return answers[choice_index], None


def record_feedback(
    session: Session,
    *,
    kind: str,
    completion: RatedCompletion,
    choice_index: int,
    value: int,
    user_id: str | None,
    author_role: str,
    comment: str | None,
    edited_text: str | None,
    idempotency_key: str | None,
    request_hash: str,
    key_id: str | None = None,
    now: datetime | None = None,
) -> Row:
    """Check a feedback signal against the stored completion and upsert it into its slot;
    return the stored row (a `feedback` table row: `Feedback`'s fields).

    Thumbs and edits address one choice (`choice_index`); a pick addresses the whole `n=2`
    completion and `choice_index` is the chosen one. The slot's unique constraint is the
    upsert's conflict target, so a concurrent first write by another process updates rather
    than fails; a reused `idempotency_key` still raises IntegrityError (the caller retries).
    """
    target, other = _slot(kind, completion, choice_index)
    completion_id, answers = completion.id, completion.answer_ids
    user = user_id or completion.user_id or "anonymous"
    now = now or utcnow()
    values = {
        "id": new_id("fb"),
        "completion_id": completion_id,
        "user_id": user,
        "key_id": key_id,
        "kind": kind,
        "target": target,
        "created_at": now,
        "message_id": answers[choice_index],
        "other_message_id": other,
        "choice_index": choice_index,
        "value": value,
        "comment": comment,
        "edited_text": edited_text,
        "author_role": author_role,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "updated_at": now,
    }
    return session.connection().execute(_upsert(session.get_bind().dialect.name), values).one()


# ---------------------------------------------------------------------------------------------
# Read back for the pair compiler


@dataclass(frozen=True)
class StoredSignals:
    """Every feedback row, and the stored answers they are relative to."""

    feedback: list[Feedback]
    # Succeeded answers sharing a parent with a rated, picked, edited or kept answer (its
    # siblings are what the signal is relative to), each with the completion that wrote it.
    answers: list[tuple[Message, Completion]]
    tenants: dict[str, str]  # conversation id -> tenant
    trees: dict[str, dict[str, Message]]  # conversation id -> its messages by id


def _chunks(ids: Sequence[str], size: int = 500) -> Iterable[Sequence[str]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


def stored_signals(session: Session) -> StoredSignals:
    """Every feedback row with the answers it concerns, their siblings, and their conversations."""
    feedback = list(session.exec(select(Feedback)).all())
    parents = _signalled_parents(session, feedback)
    answers: list[tuple[Message, Completion]] = []
    for ids in _chunks(sorted(parents)):
        answers += session.exec(
            select(Message, Completion)
            .join(Completion, col(Message.completion_id) == Completion.id)
            .where(col(Message.parent_id).in_(ids), Message.role == "assistant")
            .where(Completion.status == "succeeded")
        ).all()
    tenants: dict[str, str] = {}
    trees: dict[str, dict[str, Message]] = {}
    for ids in _chunks(sorted({c.conversation_id for _, c in answers})):
        for conv in session.exec(select(Conversation).where(col(Conversation.id).in_(ids))):
            tenants[conv.id] = conv.tenant
        for m in session.exec(select(Message).where(col(Message.conversation_id).in_(ids))):
            trees.setdefault(m.conversation_id, {})[m.id] = m
    return StoredSignals(feedback, answers, tenants, trees)


def _signalled_parents(session: Session, feedback: list[Feedback]) -> set[str]:
    """The prompts (parent message ids) of every answer with feedback or kept."""
    kept_parents = session.exec(
        select(Message.parent_id).where(col(Message.kept_at).is_not(None))
    ).all()
    signalled = sorted(
        {f.message_id for f in feedback}
        | {f.other_message_id for f in feedback if f.other_message_id}
    )
    parents = {p for p in kept_parents if p}
    for ids in _chunks(signalled):
        parents |= set(
            session.exec(select(Message.parent_id).where(col(Message.id).in_(ids))).all()
        )
    parents.discard(None)  # type: ignore[arg-type]
    return parents  # type: ignore[return-value]
