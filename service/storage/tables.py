"""Database tables (SQLModel).

A conversation is a tree of messages: each message points at its parent, so a regenerated answer
is a sibling of the one it replaces. One `Completion` is one generation request; its `n` choices
are the assistant messages that point back at it with their `choice_index`.

Feedback on those answers (`Feedback`) is compiled into training data (`PreferencePair`: DPO
pairs and, in the same table with `kind="unpaired"`, KTO rows); every operator decision on them
is logged in `OperatorAction`; a refresh is a `TrainingRun`. Alembic migrations
(`service/storage/migrations/versions/`) own the schema: a change here needs a migration
(`prefloop db revision -m ...`), or `tests/service/test_migrations.py` fails.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, ForeignKey, Index, Text, UniqueConstraint, text
from sqlmodel import AutoString, Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Conversation(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("conv"), primary_key=True)
    tenant: str = Field(default="default", index=True)
    user_id: str | None = Field(default=None, index=True)
    key_id: str | None = Field(default=None, index=True)  # the API key that started it
    created_at: datetime = Field(default_factory=utcnow, index=True)


class Message(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("msg"), primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id", index=True)
    parent_id: str | None = Field(default=None, foreign_key="message.id", index=True)
    role: str
    content: str = Field(sa_column=Column(Text, nullable=False))
    # An assistant turn's tool calls (OpenAI's `tool_calls`; its content may then be ""), and
    # a tool message's answered call.
    tool_calls: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON))
    tool_call_id: str | None = None
    # Set on assistant messages only: which completion (and which of its choices) wrote it.
    # Completion points back at Message, so this key is added after both tables exist (use_alter;
    # the migration does the same, under this name).
    completion_id: str | None = Field(
        default=None,
        sa_column=Column(
            AutoString,
            ForeignKey("completion.id", use_alter=True, name="fk_message_completion_id_completion"),
            index=True,
        ),
    )
    choice_index: int | None = None
    # The adapter version that wrote it (None: the base model, or a row from before this was
    # recorded: then its completion's). Differs from the completion's only in a head-to-head
    # turn, whose two choices come from a canary's two arms.
    adapter_version: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    # Assistant messages: set when a later request continued the conversation from this answer
    # (the user kept it; among regenerated siblings it is the preferred one).
    kept_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)


class Completion(SQLModel, table=True):
    """One generation request: what produced its assistant messages, and how it went."""

    id: str = Field(default_factory=lambda: new_id("chatcmpl"), primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id", index=True)
    # The last prompt message: the parent of every choice this completion wrote.
    parent_message_id: str = Field(foreign_key="message.id", index=True)
    user_id: str | None = Field(default=None, index=True)
    key_id: str | None = Field(default=None, index=True)  # the API key that asked (owner)
    model: str  # the name the client asked for
    base_model: str
    adapter_version: str | None = Field(default=None, index=True)
    # The adapter line it was routed to; feedback on it trains that segment only.
    segment: str = Field(default="default", index=True)
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # The tools offered with the prompt: {"tools": [...], "tool_choice": ...}; None: none.
    tools: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    stream: bool = False
    status: str = Field(default="running", index=True)  # running|succeeded|failed|cancelled
    error: str | None = Field(default=None, sa_column=Column(Text))
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    # A regeneration: the completion whose prompt this one answered again (same parent message).
    regenerated_from: str | None = Field(default=None, foreign_key="completion.id", index=True)
    # A head-to-head turn of this live canary: choice 0 and 1 came from its two arms (each
    # message's `adapter_version` says which); it counts in the canary only through its pick.
    experiment_id: str | None = Field(default=None, index=True)
    created_at: datetime = Field(default_factory=utcnow, index=True)
    finished_at: datetime | None = None


class Feedback(SQLModel, table=True):
    """One user's (or operator's) current signal on one answer.

    kind     value                    target (the unique slot per user)
    thumbs   +1 / -1                  the rated answer's message id
    pick     the chosen choice index  the completion id (an `n=2` response: one pick per user)
    edit     0                        the edited answer's message id (`edited_text` is the ideal)

    A later signal by the same user on the same slot updates the row in place (`updated_at` is
    the time of the current vote; the compiler's "later vote wins" reads it).
    `idempotency_key`/`request_hash` belong to the request that last wrote the row.
    """

    __table_args__ = (UniqueConstraint("user_id", "kind", "target", name="uq_feedback_slot"),)

    id: str = Field(default_factory=lambda: new_id("fb"), primary_key=True)
    completion_id: str = Field(foreign_key="completion.id", index=True)
    message_id: str = Field(foreign_key="message.id", index=True)  # rated / picked / edited
    other_message_id: str | None = Field(default=None, foreign_key="message.id")  # pick: loser
    choice_index: int = 0
    user_id: str = Field(index=True)
    key_id: str | None = Field(default=None, index=True)  # the API key it came through
    kind: str = Field(index=True)  # thumbs|pick|edit
    target: str
    value: int = 0
    comment: str | None = Field(default=None, sa_column=Column(Text))
    edited_text: str | None = Field(default=None, sa_column=Column(Text))
    author_role: str = "user"  # user|operator
    idempotency_key: str | None = Field(default=None, unique=True, max_length=255)
    request_hash: str | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)
    updated_at: datetime = Field(default_factory=utcnow, index=True)


class PreferencePair(SQLModel, table=True):
    """Compiled training data: a DPO pair (`kind="pair"`) or a KTO row (`kind="unpaired"`).

    One table for both, because operators review, filter and count them together and they share
    every column but the answer side: an unpaired row keeps its completion in `chosen`, has no
    `rejected`, and carries its thumbs `label`. `key` is the compiler's content key
    (`trainer.records`), so re-compiling never stores an item twice. `provenance` holds the
    message, completion, adapter and feedback ids the item came from (and the operator edits made
    to it).
    """

    id: str = Field(default_factory=lambda: new_id("pair"), primary_key=True)
    key: str = Field(unique=True)
    kind: str = Field(default="pair", index=True)  # pair|unpaired
    tenant: str = Field(default="default", index=True)
    segment: str = Field(default="default", index=True)
    prompt: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    chosen: str = Field(sa_column=Column(Text, nullable=False))
    rejected: str | None = Field(default=None, sa_column=Column(Text))
    label: bool | None = None
    source: str = Field(index=True)  # regenerate|thumbs|pick|edit
    weight: float = 1.0
    status: str = Field(default="pending", index=True)  # pending|approved|excluded|used
    excluded_reason: str | None = None
    provenance: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, index=True)
    updated_at: datetime = Field(default_factory=utcnow)


class OperatorAction(SQLModel, table=True):
    """Who did what to which rows, when: the audit log of the operator API."""

    id: str = Field(default_factory=lambda: new_id("op"), primary_key=True)
    actor: str = Field(index=True)
    action: str = Field(index=True)
    target_ids: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, index=True)


class TrainingRun(SQLModel, table=True):
    """One refresh: compile -> train -> evaluate -> gate -> register -> promote, as it happens.

    `steps` is a list of {name, started_at, seconds, detail} in order; `progress` is the
    training's latest {step, total, loss, margin, accuracy} and its `history` ([step, loss,
    margin] per logged step, for the console's plot); `counts` the pair numbers (compiled,
    used for training, held out); `log` the tail of the training and evaluation subprocesses'
    output. Operators watch it through `/v1/operator/runs/{id}` while it runs.
    """

    id: str = Field(default_factory=lambda: new_id("run"), primary_key=True)
    segment: str = Field(default="default", index=True)
    trigger: str = "manual"  # manual|schedule|threshold|api
    actor: str = "system"
    # queued|running|succeeded|skipped|failed|cancelled; `outcome` says what a success did.
    status: str = Field(default="queued", index=True)
    outcome: str | None = None  # promoted|canary|approved|rejected
    stage: str | None = None
    steps: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    progress: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    counts: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    verdict: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    parent_version: str | None = None
    candidate_version: str | None = None
    error: str | None = Field(default=None, sa_column=Column(Text))
    log: str = Field(default="", sa_column=Column(Text, nullable=False))
    cancel_requested: bool = False
    holder: str | None = None  # the process running it
    created_at: datetime = Field(default_factory=utcnow, index=True)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class Lease(SQLModel, table=True):
    """A named lock with an expiry, held by one process: one refresh at a time, fleet-wide.
    A crashed holder stops renewing and its lease expires."""

    name: str = Field(primary_key=True)
    holder: str
    expires_at: datetime
    acquired_at: datetime = Field(default_factory=utcnow)


class ApiKey(SQLModel, table=True):
    """An API key. Only the SHA-256 of the secret is stored; the secret is shown once.

    role     user: chat and feedback on its own completions; operator: also the operator API
             of its tenant; admin: every tenant, keys and user deletion.
    public   a widget key: chat and feedback only, from `origins` only (CORS allow-list).
    """

    id: str = Field(default_factory=lambda: new_id("key"), primary_key=True)
    name: str = Field(index=True)  # who holds it; an operator key's name is the audit log's actor
    prefix: str  # the secret's first characters, to recognise it in lists
    hash: str = Field(unique=True)
    role: str = "user"  # user|operator|admin
    tenant: str = Field(default="default", index=True)
    public: bool = False
    origins: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class Tombstone(SQLModel, table=True):
    """A deleted user: their conversations and feedback are gone, and nothing they send later
    trains a model (the compiler skips their signals)."""

    user_id: str = Field(primary_key=True)
    tenant: str = Field(default="default", primary_key=True)
    actor: str
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class Experiment(SQLModel, table=True):
    """A live canary: a sticky `share` of a segment's end users is served the candidate version,
    the rest the incumbent (None: the base model), until a sequential test on their feedback
    promotes or rolls back the candidate, or it stops without a decision
    (`service.loop.live_watch`).

    At most one experiment per segment runs: a partial unique index, like the registry's one
    active version per segment, makes the database refuse a second. `snapshot` is the last
    decision's numbers (counts per arm, rates, the interval); `reason` says why it ended (or,
    while running, what the last look found).
    """

    __table_args__ = (
        Index(
            "uq_experiment_one_running",
            "segment",
            unique=True,
            sqlite_where=text("status = 'running'"),
            postgresql_where=text("status = 'running'"),
        ),
    )

    id: str = Field(default_factory=lambda: new_id("exp"), primary_key=True)
    tenant: str = Field(default="default", index=True)
    segment: str = Field(index=True)
    candidate: str = Field(index=True)  # an adapter version id
    incumbent: str | None = None  # the active version it started against; None: the base model
    share: float  # of end users served the candidate, 0 < share < 1
    policy: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="running", index=True)  # running|promoted|rolled_back|stopped
    reason: str | None = Field(default=None, sa_column=Column(Text))
    snapshot: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_by: str = "system"
    ended_by: str | None = None
    started_at: datetime = Field(default_factory=utcnow, index=True)
    decided_at: datetime | None = None  # the last look of the decision loop
    ended_at: datetime | None = None
