"""Deleting a user's data, and the retention period for raw conversations.

`delete_user` removes the user's conversations (every message, completion and feedback in them),
their feedback elsewhere, and the compiled pairs that came from either, in one transaction, and
leaves a `Tombstone`: the compiler skips the user's signals from then on, so nothing they send
later trains a model either. Adapters already trained on their data are not retrained.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import timedelta

from sqlalchemy import delete, func, update
from sqlalchemy.engine import Engine as Database
from sqlmodel import Session, col, select

from service.core.config import Settings
from service.storage.db import session_scope
from service.storage.tables import (
    Completion,
    Conversation,
    Feedback,
    Message,
    OperatorAction,
    PreferencePair,
    Tombstone,
    utcnow,
)

_PAIR_REFS = (
    "message_id",
    "completion_id",
    "chosen_message_id",
    "rejected_message_id",
    "chosen_completion_id",
    "rejected_completion_id",
)


def _delete_conversations(session: Session, conversation_ids: Collection[str]) -> dict[str, int]:
    """Delete conversations with everything in them; returns the row counts."""
    ids = list(conversation_ids)
    if not ids:
        return {"conversations": 0, "messages": 0, "completions": 0, "feedback": 0}
    in_convs = col(Message.conversation_id).in_(ids)
    message_ids = select(Message.id).where(in_convs)
    completion_ids = select(Completion.id).where(col(Completion.conversation_id).in_(ids))
    feedback = session.exec(  # type: ignore[call-overload]
        delete(Feedback).where(
            col(Feedback.completion_id).in_(completion_ids)
            | col(Feedback.message_id).in_(message_ids)
            | col(Feedback.other_message_id).in_(message_ids)
        )
    ).rowcount
    # Messages and completions point at each other (and at themselves): unlink, then delete.
    session.exec(update(Message).where(in_convs).values(completion_id=None, parent_id=None))  # type: ignore[call-overload]
    session.exec(  # type: ignore[call-overload]
        update(Completion)
        .where(col(Completion.conversation_id).in_(ids))
        .values(regenerated_from=None)
    )
    completions = session.exec(  # type: ignore[call-overload]
        delete(Completion).where(col(Completion.conversation_id).in_(ids))
    ).rowcount
    messages = session.exec(delete(Message).where(in_convs)).rowcount  # type: ignore[call-overload]
    conversations = session.exec(  # type: ignore[call-overload]
        delete(Conversation).where(col(Conversation.id).in_(ids))
    ).rowcount
    return {
        "conversations": conversations,
        "messages": messages,
        "completions": completions,
        "feedback": feedback,
    }


def delete_user(
    db: Database, *, user_id: str, tenant: str = "default", actor: str = "system"
) -> dict[str, int]:
    """Remove a user's conversations, feedback and the pairs compiled from them; tombstone
    them. Idempotent: deleting a deleted user removes what they sent since."""
    with session_scope(db) as session:
        conversation_ids = _conversations_of(session, user_id=user_id, tenant=tenant)
        gone = _ids_in(session, conversation_ids)
        counts = _delete_conversations(session, conversation_ids)
        # Their feedback on other conversations of this tenant.
        in_tenant = (
            select(Completion.id)
            .join(Conversation, col(Conversation.id) == Completion.conversation_id)
            .where(Conversation.tenant == tenant)
        )
        counts["feedback"] += session.exec(  # type: ignore[call-overload]
            delete(Feedback).where(
                Feedback.user_id == user_id, col(Feedback.completion_id).in_(in_tenant)
            )
        ).rowcount
        counts["pairs"] = _delete_pairs(session, user_id=user_id, tenant=tenant, refs=gone)
        if session.get(Tombstone, (user_id, tenant)) is None:
            session.add(Tombstone(user_id=user_id, tenant=tenant, actor=actor, detail=counts))
        session.add(
            OperatorAction(
                actor=actor,
                action="delete_user",
                target_ids=[user_id],
                detail={"tenant": tenant, **counts},
            )
        )
    return counts


def _conversations_of(session: Session, *, user_id: str, tenant: str) -> set[str]:
    """The user's conversations, and those where they asked for a completion."""
    own = session.exec(
        select(Conversation.id).where(
            Conversation.user_id == user_id, Conversation.tenant == tenant
        )
    ).all()
    asked = session.exec(
        select(Completion.conversation_id)
        .join(Conversation, col(Conversation.id) == Completion.conversation_id)
        .where(Completion.user_id == user_id, Conversation.tenant == tenant)
    ).all()
    return set(own) | set(asked)


def _ids_in(session: Session, conversation_ids: Collection[str]) -> set[str]:
    """The ids of every message and completion in these conversations."""
    messages = session.exec(
        select(Message.id).where(col(Message.conversation_id).in_(conversation_ids))
    ).all()
    completions = session.exec(
        select(Completion.id).where(col(Completion.conversation_id).in_(conversation_ids))
    ).all()
    return set(messages) | set(completions)


def _delete_pairs(session: Session, *, user_id: str, tenant: str, refs: set[str]) -> int:
    """Delete the tenant's pairs signalled by the user or made of the deleted messages and
    completions (`refs`); returns how many."""
    pairs = [
        p.id
        for p in session.exec(select(PreferencePair).where(PreferencePair.tenant == tenant)).all()
        if p.provenance.get("user_id") == user_id
        or any(p.provenance.get(k) in refs for k in _PAIR_REFS)
    ]
    if pairs:
        session.exec(delete(PreferencePair).where(col(PreferencePair.id).in_(pairs)))  # type: ignore[call-overload]
    return len(pairs)


def tombstoned(session: Session) -> set[tuple[str, str]]:
    """(tenant, user_id) of every deleted user."""
    return {(t.tenant, t.user_id) for t in session.exec(select(Tombstone)).all()}


def purge_expired(db: Database, settings: Settings) -> int:
    """Delete conversations with no message newer than `retention_days`; returns how many."""
    if settings.retention_days <= 0:
        return 0
    cutoff = utcnow() - timedelta(days=settings.retention_days)
    with session_scope(db) as session:
        last = (
            select(Message.conversation_id)
            .group_by(col(Message.conversation_id))
            .having(func.max(Message.created_at) < cutoff)
        )
        empty = select(Conversation.id).where(
            Conversation.created_at < cutoff,
            ~col(Conversation.id).in_(select(Message.conversation_id)),
        )
        ids = set(session.exec(last).all()) | set(session.exec(empty).all())
        counts = _delete_conversations(session, ids)
        if ids:
            session.add(
                OperatorAction(actor="retention", action="purge", target_ids=[], detail=counts)
            )
    return counts["conversations"]
