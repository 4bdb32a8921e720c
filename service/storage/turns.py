"""Stored chat turns: conversations, messages (a tree: a regeneration is a sibling) and the
completions that answered them. Plain functions over a session, keyword-only.

Routes call these in a worker thread (the database driver blocks) and only answer the client
after the surrounding transaction has committed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from service.core.errors import InvalidRequestError, NotFoundError
from service.core.identity import Principal
from service.storage.tables import Completion, Conversation, Message, utcnow


@dataclass(frozen=True)
class StartedTurn:
    completion: Completion
    prompt: list[dict[str, Any]]  # the full conversation the model answers


@dataclass(frozen=True)
class ChoiceRecord:
    message_id: str
    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int
    tool_calls: list[dict[str, Any]] | None = None
    adapter_version: str | None = None  # what wrote it (None: the base model)


def as_prompt(m: Message) -> dict[str, Any]:
    """A stored message as the OpenAI message the client sent (and the engine is given)."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def path_to(messages: dict[str, Message], leaf_id: str) -> list[Message]:
    path: list[Message] = []
    node: Message | None = messages[leaf_id]
    while node is not None:
        path.append(node)
        node = messages.get(node.parent_id) if node.parent_id else None
    return path[::-1]


def _resent_leaf(by_id: dict[str, Message], messages: list[dict[str, str]]) -> str | None:
    """The deepest stored message whose path is a proper prefix of `messages`: a client that
    resends the history continues from the answer it shows, which need not be the newest one
    (after a regeneration the user may go on from either sibling)."""
    best: tuple[int, str] | None = None
    for m in by_id.values():
        path = path_to(by_id, m.id)
        if len(path) >= len(messages) or (best is not None and len(path) <= best[0]):
            continue
        if all(
            p.role == q["role"] and p.content == q["content"]
            for p, q in zip(path, messages, strict=False)
        ):
            best = (len(path), m.id)
    return best[1] if best else None


def _history(
    session: Session,
    *,
    conversation_id: str,
    parent_id: str | None,
    caller: Principal,
    messages: list[dict[str, str]] | None = None,
) -> list[Message]:
    conversation = session.get(Conversation, conversation_id)
    if conversation is None or not caller.owns(
        conversation.key_id, conversation.tenant, conversation.user_id
    ):
        raise NotFoundError(f"conversation {conversation_id!r} not found", param="conversation_id")
    rows = session.exec(select(Message).where(Message.conversation_id == conversation_id)).all()
    by_id = {m.id: m for m in rows}
    if parent_id is None and messages and len(messages) > 1:
        parent_id = _resent_leaf(by_id, messages)
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
    return path_to(by_id, parent_id)


@dataclass(frozen=True)
class CompletionSpec:
    """How a turn is answered, stored on its completion."""

    model: str  # the name the client used
    base_model: str
    adapter_version: str | None
    params: dict[str, Any]
    stream: bool
    segment: str = "default"
    tools: dict[str, Any] | None = None  # offered to the model


def start_completion(
    session: Session,
    *,
    caller: Principal,
    user_id: str | None,
    conversation_id: str | None,
    parent_id: str | None,
    messages: list[dict[str, str]],
    spec: CompletionSpec,
    experiment_id: str | None = None,
) -> StartedTurn:
    """Store the request's new messages and a running completion; return the prompt to answer.

    A client may resend the whole conversation (as OpenAI clients do) or only the new messages:
    when the stored history is a prefix of `messages`, that prefix is not stored twice. An
    assistant message the new turn continues from is marked kept. `experiment_id`: a
    head-to-head turn of that live canary.
    """
    conversation, history = _conversation(
        session,
        caller=caller,
        user_id=user_id,
        conversation_id=conversation_id,
        parent_id=parent_id,
        messages=messages,
    )
    stored = [as_prompt(m) for m in history]
    new = messages[len(stored) :] if messages[: len(stored)] == stored else messages
    if not new or new[-1]["role"] not in ("user", "tool"):
        raise InvalidRequestError(
            "the last message must be a user message (the one to answer), or a tool result",
            param="messages",
        )
    parent = _store_messages(session, conversation.id, history, new)
    completion = Completion(
        conversation_id=conversation.id,
        parent_message_id=parent,
        user_id=user_id,
        key_id=caller.key_id,
        experiment_id=experiment_id,
        **asdict(spec),
    )
    session.add(completion)
    session.flush()
    return StartedTurn(completion=completion, prompt=stored + new)


def _conversation(
    session: Session,
    *,
    caller: Principal,
    user_id: str | None,
    conversation_id: str | None,
    parent_id: str | None,
    messages: list[dict[str, str]],
) -> tuple[Conversation, list[Message]]:
    """The conversation a turn joins (a new one without `conversation_id`) and the stored
    path it continues from."""
    if conversation_id is None:
        if parent_id is not None:
            raise InvalidRequestError(
                "parent_id needs the conversation_id it belongs to", param="parent_id"
            )
        conversation = Conversation(tenant=caller.tenant, user_id=user_id, key_id=caller.key_id)
        session.add(conversation)
        return conversation, []
    history = _history(
        session,
        conversation_id=conversation_id,
        parent_id=parent_id,
        caller=caller,
        messages=messages,
    )
    conversation = session.get(Conversation, conversation_id)
    assert conversation is not None
    return conversation, history


def _store_messages(
    session: Session, conversation_id: str, history: list[Message], new: list[dict[str, Any]]
) -> str:
    """Store the new messages under the end of `history`, marking the answer they continue
    from as kept; returns the id of the last one (the parent of the answers)."""
    if history and history[-1].role == "assistant" and history[-1].kept_at is None:
        history[-1].kept_at = utcnow()
        session.add(history[-1])
    parent = history[-1].id if history else None
    for m in new:
        row = Message(
            conversation_id=conversation_id,
            parent_id=parent,
            role=m["role"],
            content=m["content"],
            tool_calls=m.get("tool_calls"),
            tool_call_id=m.get("tool_call_id"),
        )
        session.add(row)
        parent = row.id
    assert parent is not None
    # Message and Completion reference each other, so the unit of work cannot order them
    # itself: write the messages first.
    session.flush()
    return parent


def start_regeneration(
    session: Session,
    *,
    caller: Principal,
    user_id: str | None,
    conversation_id: str | None,
    messages: list[dict[str, str]],
    regenerate: str,
    spec: CompletionSpec,
) -> StartedTurn:
    """Answer an earlier completion's prompt again: nothing new is stored but the completion,
    under the same parent message, so its answers become siblings of the earlier ones."""
    original = owned_completion(session, completion_id=regenerate, caller=caller)
    if original is None:
        raise NotFoundError(f"completion {regenerate!r} not found", param="regenerate")
    if conversation_id is not None and conversation_id != original.conversation_id:
        raise InvalidRequestError(
            f"completion {regenerate!r} belongs to conversation {original.conversation_id!r}, "
            f"not {conversation_id!r}",
            param="conversation_id",
        )
    by_id = {
        m.id: m
        for m in session.exec(
            select(Message).where(Message.conversation_id == original.conversation_id)
        ).all()
    }
    prompt = [as_prompt(m) for m in path_to(by_id, original.parent_message_id)]
    # OpenAI clients resend the history: accept it when it is the stored prompt (or its tail).
    if messages and prompt[-len(messages) :] != messages:
        raise InvalidRequestError(
            "a regeneration answers the stored prompt again: send no messages, or exactly the "
            "ones that completion answered",
            param="messages",
        )
    params = spec.params
    if params.get("response_format") is None:
        # A regenerate button sends no format: the new answers take the earlier one's.
        params = {**params, "response_format": original.params.get("response_format")}
    # Answered again with the tools it was asked with, unless this request offers its own.
    tools = spec.tools if spec.tools is not None else original.tools
    completion = Completion(
        conversation_id=original.conversation_id,
        parent_message_id=original.parent_message_id,
        user_id=user_id if user_id is not None else original.user_id,
        key_id=caller.key_id,
        regenerated_from=original.id,
        **asdict(replace(spec, params=params, tools=tools)),
    )
    session.add(completion)
    session.flush()
    return StartedTurn(completion=completion, prompt=prompt)


def owned_completion(
    session: Session, *, completion_id: str, caller: Principal
) -> Completion | None:
    """The completion, if `caller` may read, regenerate or rate it; None otherwise (the caller
    then answers 404, so another key's ids reveal nothing)."""
    row = session.exec(
        select(Completion, Conversation.tenant)
        .join(Conversation, col(Conversation.id) == Completion.conversation_id)
        .where(Completion.id == completion_id)
    ).first()
    if row is None or not caller.owns(row[0].key_id, row[1], row[0].user_id):
        return None
    return row[0]


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
                tool_calls=c.tool_calls,
                adapter_version=c.adapter_version,
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


def sweep_interrupted_completions(session: Session, older_than: datetime) -> int:
    """Completions still `running` that started before ``older_than`` (longer than any answer
    takes) were cut off by a crash: mark them failed so nothing waits on them. Their prompts
    and the conversation are kept."""
    result = session.exec(
        update(Completion)
        .where(col(Completion.status) == "running", col(Completion.created_at) < older_than)
        .values(
            status="failed",
            error="interrupted: the server stopped before the answer finished",
            finished_at=utcnow(),
        )
    )
    return result.rowcount
