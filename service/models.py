"""Database tables (SQLModel).

A conversation is a tree of messages: each message points at its parent, so a regenerated answer
is a sibling of the one it replaces. One `Completion` is one generation request; its `n` choices
are the assistant messages that point back at it with their `choice_index`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, Text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Conversation(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("conv"), primary_key=True)
    tenant: str = Field(default="default", index=True)
    user_id: str | None = Field(default=None, index=True)
    created_at: datetime = Field(default_factory=utcnow, index=True)


class Message(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("msg"), primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id", index=True)
    parent_id: str | None = Field(default=None, foreign_key="message.id", index=True)
    role: str
    content: str = Field(sa_column=Column(Text, nullable=False))
    # Set on assistant messages only: which completion (and which of its choices) wrote it.
    completion_id: str | None = Field(default=None, foreign_key="completion.id", index=True)
    choice_index: int | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    created_at: datetime = Field(default_factory=utcnow)


class Completion(SQLModel, table=True):
    """One generation request: what produced its assistant messages, and how it went."""

    id: str = Field(default_factory=lambda: new_id("chatcmpl"), primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id", index=True)
    # The last prompt message: the parent of every choice this completion wrote.
    parent_message_id: str = Field(foreign_key="message.id", index=True)
    user_id: str | None = Field(default=None, index=True)
    model: str  # the name the client asked for
    base_model: str
    adapter_version: str | None = Field(default=None, index=True)
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    stream: bool = False
    status: str = Field(default="running", index=True)  # running|succeeded|failed|cancelled
    error: str | None = Field(default=None, sa_column=Column(Text))
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)
    finished_at: datetime | None = None
