"""Reads and writes of the stored exchanges. Plain functions over a session, keyword-only.

Routes call these in a worker thread (the database driver blocks) and only answer the client
after the surrounding transaction has committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from service.core.errors import InvalidRequestError, NotFoundError
from service.models import Completion, Conversation, Message, new_id, utcnow


@dataclass(frozen=True)
class StartedTurn:
    completion: Completion
    prompt: list[dict[str, str]]  # the full conversation the model answers


@dataclass(frozen=True)
class ChoiceRecord:
    message_id: str
    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int


def _path_to(messages: dict[str, Message], leaf_id: str) -> list[Message]:
    path: list[Message] = []
    node: Message | None = messages[leaf_id]
    while node is not None:
        path.append(node)
        node = messages.get(node.parent_id) if node.parent_id else None
    return path[::-1]


def _history(
    session: Session, *, conversation_id: str, parent_id: str | None, tenant: str
) -> list[Message]:
    conversation = session.get(Conversation, conversation_id)
    if conversation is None or conversation.tenant != tenant:
        raise NotFoundError(f"conversation {conversation_id!r} not found", param="conversation_id")
    rows = session.exec(select(Message).where(Message.conversation_id == conversation_id)).all()
    by_id = {m.id: m for m in rows}
    if parent_id is None:
        answers = [m for m in rows if m.role == "assistant"] or list(rows)
        if not answers:
            return []
        parent_id = max(answers, key=lambda m: (m.created_at, m.id)).id
    if parent_id not in by_id:
        raise NotFoundError(
            f"message {parent_id!r} not found in conversation {conversation_id!r}",
            param="parent_id",
        )
    return _path_to(by_id, parent_id)


def start_completion(
    session: Session,
    *,
    tenant: str,
    user_id: str | None,
    conversation_id: str | None,
    parent_id: str | None,
    messages: list[dict[str, str]],
    model: str,
    base_model: str,
    adapter_version: str | None,
    params: dict[str, Any],
    stream: bool,
) -> StartedTurn:
    """Store the request's new messages and a running completion; return the prompt to answer.

    A client may resend the whole conversation (as OpenAI clients do) or only the new messages:
    when the stored history is a prefix of `messages`, that prefix is not stored twice.
    """
    if conversation_id is None:
        if parent_id is not None:
            raise InvalidRequestError(
                "parent_id needs the conversation_id it belongs to", param="parent_id"
            )
        conversation = Conversation(tenant=tenant, user_id=user_id)
        session.add(conversation)
        history: list[Message] = []
    else:
        history = _history(
            session, conversation_id=conversation_id, parent_id=parent_id, tenant=tenant
        )
        conversation = session.get(Conversation, conversation_id)
    assert conversation is not None

    stored = [{"role": m.role, "content": m.content} for m in history]
    new = messages[len(stored) :] if messages[: len(stored)] == stored else messages
    if not new or new[-1]["role"] != "user":
        raise InvalidRequestError(
            "the last message must be a user message (the one to answer)", param="messages"
        )

    parent = history[-1].id if history else None
    for m in new:
        row = Message(
            conversation_id=conversation.id, parent_id=parent, role=m["role"], content=m["content"]
        )
        session.add(row)
        parent = row.id
    assert parent is not None
    # Message and Completion reference each other, so the unit of work cannot order them
    # itself: write the messages first.
    session.flush()
    completion = Completion(
        conversation_id=conversation.id,
        parent_message_id=parent,
        user_id=user_id,
        model=model,
        base_model=base_model,
        adapter_version=adapter_version,
        params=params,
        stream=stream,
    )
    session.add(completion)
    session.flush()
    return StartedTurn(completion=completion, prompt=stored + new)


def finish_completion(
    session: Session,
    *,
    completion_id: str,
    choices: list[ChoiceRecord],
    status: str,
    error: str | None,
    prompt_tokens: int | None,
    latency_ms: float,
) -> Completion:
    """Store the answers (one assistant message per choice) and close the completion."""
    completion = session.get(Completion, completion_id)
    if completion is None:
        raise NotFoundError(f"completion {completion_id!r} not found")
    for c in choices:
        session.add(
            Message(
                id=c.message_id,
                conversation_id=completion.conversation_id,
                parent_id=completion.parent_message_id,
                role="assistant",
                content=c.text,
                completion_id=completion_id,
                choice_index=c.index,
                finish_reason=c.finish_reason,
                completion_tokens=c.completion_tokens,
            )
        )
    completion.status = status
    completion.error = error
    completion.prompt_tokens = prompt_tokens
    completion.completion_tokens = sum(c.completion_tokens for c in choices)
    completion.latency_ms = latency_ms
    completion.finished_at = utcnow()
    session.add(completion)
    return completion


def answers_of(session: Session, *, completion_id: str) -> list[Message]:
    return list(
        session.exec(
            select(Message)
            .where(Message.completion_id == completion_id)
            .order_by(col(Message.choice_index))
        ).all()
    )


__all__ = [
    "ChoiceRecord",
    "StartedTurn",
    "answers_of",
    "finish_completion",
    "new_id",
    "start_completion",
]
