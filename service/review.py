"""The operator queue: list feedback and pairs, and act on pairs (approve, exclude, flip,
replace the chosen side). Every action is one transaction that also writes its
`OperatorAction` row, so the audit log cannot miss a change."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import Engine as Database
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from adapters.registry import as_utc
from service.core.errors import ConflictError, InvalidRequestError, NotFoundError
from service.storage.db import session_scope
from service.storage.tables import (
    Completion,
    Conversation,
    Feedback,
    Message,
    OperatorAction,
    PreferencePair,
    utcnow,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    has_more: bool  # more after these, at the next offset


@dataclass(frozen=True)
class QueueEntry:
    """A feedback row with the answer it is about."""

    feedback: Feedback
    segment: str
    adapter_version: str | None
    prompt: str  # the last prompt message (what the answer answered)
    answer: str  # the rated / picked / edited answer


@dataclass(frozen=True)
class RatePoint:
    t: datetime  # the bucket's start
    up: int
    down: int
    rate: float  # up / (up + down)


@dataclass(frozen=True)
class RateSeries:
    version: str  # an adapter version id, or "base" for the base model
    points: list[RatePoint]


@dataclass(frozen=True)
class ActionTaken:
    """An operator's action on pairs: its audit log row's id, and the pairs as they are now."""

    id: str
    action: str
    actor: str
    pairs: list[PreferencePair]


def list_feedback(
    db: Database,
    *,
    kind: str | None = None,
    rating: int | None = None,
    user: str | None = None,
    segment: str | None = None,
    adapter_version: str | None = None,
    has_comment: bool | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
    tenant: str | None = None,
) -> Page[QueueEntry]:
    """Newest first (by the time of the current vote), each with the answer it is about.
    `adapter_version="base"` selects answers of the base model."""
    answer, prompt = aliased(Message), aliased(Message)
    q = (
        select(Feedback, Completion.segment, Completion.adapter_version, prompt.content,
               answer.content)
        .join(Completion, col(Feedback.completion_id) == Completion.id)
        .join(answer, col(Feedback.message_id) == answer.id)
        .join(prompt, col(Completion.parent_message_id) == prompt.id)
    )  # fmt: skip
    if tenant is not None:  # only that tenant's
        q = q.join(Conversation, col(Conversation.id) == Completion.conversation_id).where(
            Conversation.tenant == tenant
        )
    q = q.where(*_feedback_filters(kind, rating, user, segment, adapter_version, has_comment))
    if since is not None:
        q = q.where(Feedback.updated_at >= since)
    if until is not None:
        q = q.where(Feedback.updated_at < until)
    q = q.order_by(col(Feedback.updated_at).desc(), col(Feedback.id).desc())
    with Session(db) as session:
        rows = session.exec(q.offset(offset).limit(limit + 1)).all()
    return Page([QueueEntry(*row) for row in rows[:limit]], has_more=len(rows) > limit)


def _feedback_filters(
    kind: str | None,
    rating: int | None,
    user: str | None,
    segment: str | None,
    adapter_version: str | None,
    has_comment: bool | None,
) -> list[Any]:
    where: list[Any] = []
    if kind is not None:
        where.append(Feedback.kind == kind)
    if rating is not None:
        where += [Feedback.kind == "thumbs", Feedback.value == rating]
    if user is not None:
        where.append(Feedback.user_id == user)
    if segment is not None:
        where.append(Completion.segment == segment)
    if adapter_version == "base":
        where.append(col(Completion.adapter_version).is_(None))
    elif adapter_version is not None:
        where.append(Completion.adapter_version == adapter_version)
    if has_comment is True:
        where += [col(Feedback.comment).is_not(None), Feedback.comment != ""]
    elif has_comment is False:
        where.append((col(Feedback.comment).is_(None)) | (Feedback.comment == ""))
    return where


def thumbs_rate(
    db: Database,
    *,
    segment: str | None,
    since: datetime,
    bucket_seconds: int,
    visible: list[str] | None = None,
) -> list[RateSeries]:
    """The thumbs-up rate of each adapter version ("base": the base model) per time bucket,
    by the time of the vote. Bucketed here rather than in SQL: date arithmetic differs between
    SQLite and Postgres, and the console asks for days, not years, of votes."""
    q = (
        select(Feedback.updated_at, Feedback.value, Completion.adapter_version)
        .join(Completion, col(Feedback.completion_id) == Completion.id)
        .where(Feedback.kind == "thumbs", Feedback.updated_at >= since)
    )
    if segment is not None:
        q = q.where(Completion.segment == segment)
    elif visible is not None:  # an operator's own tenant's segments; None: every segment
        q = q.where(col(Completion.segment).in_(visible))
    with Session(db) as session:
        rows = session.exec(q).all()
    counts: dict[str, dict[int, list[int]]] = {}
    for when, value, version in rows:
        # Buckets on whole multiples since the epoch: minutes and hours start on the clock's.
        bucket = int(as_utc(when).timestamp() // bucket_seconds)
        up_down = counts.setdefault(version or "base", {}).setdefault(bucket, [0, 0])
        up_down[0 if value > 0 else 1] += 1
    series = [
        RateSeries(
            version=version,
            points=[
                RatePoint(
                    t=datetime.fromtimestamp(b * bucket_seconds, UTC),
                    up=up,
                    down=down,
                    rate=up / (up + down),
                )
                for b, (up, down) in sorted(buckets.items())
            ],
        )
        for version, buckets in sorted(counts.items())
    ]
    return series


def list_pairs(
    db: Database,
    *,
    status: str | None = None,
    source: str | None = None,
    segment: str | None = None,
    kind: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
    tenant: str | None = None,
) -> Page[PreferencePair]:
    """Newest first (by the time the pair was stored). `tenant`: only that tenant's."""
    q = select(PreferencePair)
    for column, value in (
        (PreferencePair.tenant, tenant),
        (PreferencePair.status, status),
        (PreferencePair.source, source),
        (PreferencePair.segment, segment),
        (PreferencePair.kind, kind),
    ):
        if value is not None:
            q = q.where(column == value)
    if since is not None:
        q = q.where(PreferencePair.created_at >= since)
    if until is not None:
        q = q.where(PreferencePair.created_at < until)
    q = q.order_by(col(PreferencePair.created_at).desc(), col(PreferencePair.id).desc())
    with Session(db) as session:
        rows = session.exec(q.offset(offset).limit(limit + 1)).all()
    return Page(list(rows[:limit]), has_more=len(rows) > limit)


def _apply(row: PreferencePair, action: str, text: str | None, actor: str) -> dict[str, Any]:
    """Change one pair in place; returns what changed, for the audit log."""
    if row.status == "used":
        raise ConflictError(
            f"pair {row.id!r} was already used for training; it is kept as trained on",
            param="ids",
            code="pair_used",
        )
    before = {"status": row.status}
    if action == "approve":
        row.status, row.excluded_reason = "approved", None
    elif action == "exclude":
        row.status, row.excluded_reason = "excluded", f"operator:{actor}"
    elif action == "flip":
        if row.kind == "unpaired":
            row.label = not row.label
        else:
            assert row.rejected is not None
            row.chosen, row.rejected = row.rejected, row.chosen
            p = dict(row.provenance)
            for a, b in (
                ("chosen_message_id", "rejected_message_id"),
                ("chosen_completion_id", "rejected_completion_id"),
                ("chosen_adapter_version", "rejected_adapter_version"),
                ("chosen_sampling", "rejected_sampling"),
            ):
                p[a], p[b] = p.get(b), p.get(a)
            row.provenance = p
    elif action == "replace_chosen":
        if row.kind == "unpaired":
            raise InvalidRequestError(
                f"{row.id!r} is an unpaired (KTO) row: it has no chosen side to replace",
                param="ids",
            )
        if not text or not text.strip():
            raise InvalidRequestError("replace_chosen needs the new chosen text", param="text")
        before["chosen"] = row.chosen
        row.chosen = text
        row.provenance = row.provenance | {
            "chosen_message_id": None,
            "chosen_completion_id": None,
            "chosen_replaced_by": actor,
        }
    else:  # the schema's Literal admits nothing else
        raise InvalidRequestError(f"unknown action {action!r}", param="action")
    row.updated_at = utcnow()
    return before


def act_on_pairs(
    db: Database,
    *,
    action: str,
    ids: list[str],
    text: str | None,
    actor: str,
    tenant: str | None = None,
) -> ActionTaken:
    """Apply one action to every listed pair, all or nothing, and log it. `tenant`: pairs of
    other tenants count as missing (404), as if they did not exist."""
    unique = list(dict.fromkeys(ids))
    with session_scope(db) as session:
        rows = {
            r.id: r
            for r in session.exec(select(PreferencePair).where(col(PreferencePair.id).in_(unique)))
        }
        if tenant is not None:
            rows = {i: r for i, r in rows.items() if r.tenant == tenant}
        missing = [i for i in unique if i not in rows]
        if missing:
            raise NotFoundError(f"no such pair(s): {', '.join(missing)}", param="ids")
        before = {i: _apply(rows[i], action, text, actor) for i in unique}
        session.add_all(rows.values())
        log = OperatorAction(
            actor=actor,
            action=f"pairs.{action}",
            target_ids=unique,
            detail={"before": before} | ({"text": text} if text is not None else {}),
        )
        session.add(log)
        session.flush()
    return ActionTaken(log.id, action, actor, [rows[i] for i in unique])
