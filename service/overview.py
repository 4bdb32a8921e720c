"""The console's landing numbers for one operator: feedback per day, the thumbs-up rate of each
adapter version per day, what waits for review, and the last refresh with its verdict. Each is
scoped to the operator's tenant as the other operator reads are: feedback by its
conversation's tenant, pairs by their own, runs by their segment's owner."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlalchemy.engine import Engine as Database
from sqlmodel import Session, col, select

from adapters.registry import as_utc
from service.review import RatePoint, RateSeries
from service.storage.tables import Completion, Conversation, Feedback, PreferencePair, TrainingRun

DAY = timedelta(days=1)


@dataclass
class DayCount:
    day: date  # a UTC day
    thumbs_up: int = 0
    thumbs_down: int = 0
    picks: int = 0
    edits: int = 0


@dataclass(frozen=True)
class Overview:
    """The last `days` UTC days of feedback, what waits for an operator's review, and the last
    refresh (None: none yet)."""

    since: datetime  # the first day's start
    days: int
    feedback_per_day: list[DayCount]  # every day, oldest first
    thumbs_rate: list[RateSeries]  # per adapter version ("base": the base model), per day
    pending_pairs: int  # pairs waiting for approval
    pending_unpaired: int  # lone thumbs (KTO rows) waiting for approval
    last_run: TrainingRun | None


def run_scope(segment_tenants: dict[str, str], tenant: str | None) -> list[Any]:
    """Where-clauses that keep a tenant's refresh runs (None: every run). Segments are named
    in settings; segments not named there belong to `default`."""
    if tenant is None:
        return []
    mine = [s for s, t in segment_tenants.items() if t == tenant]
    others = [s for s, t in segment_tenants.items() if t != tenant]
    clauses = [col(TrainingRun.segment).not_in(others)]
    if tenant != "default":
        clauses.append(col(TrainingRun.segment).in_(mine))
    return clauses


def _votes(session: Session, since: datetime, tenant: str | None) -> list[Any]:
    q = (
        select(Feedback.updated_at, Feedback.kind, Feedback.value, Completion.adapter_version)
        .join(Completion, col(Feedback.completion_id) == Completion.id)
        .where(Feedback.updated_at >= since)
    )
    if tenant is not None:
        q = q.join(Conversation, col(Conversation.id) == Completion.conversation_id).where(
            Conversation.tenant == tenant
        )
    return list(session.exec(q).all())


def _per_day(
    rows: list[Any], since: datetime, days: int
) -> tuple[list[DayCount], list[RateSeries]]:
    """Feedback counts for every day (zeros included, so a chart has no holes) and each
    version's thumbs per day. Days in Python, as `thumbs_rate` does: date arithmetic differs
    between SQLite and Postgres."""
    counts = [DayCount(day=(since + i * DAY).date()) for i in range(days)]
    thumbs: dict[str, dict[int, list[int]]] = {}
    for when, kind, value, version in rows:
        i = (as_utc(when) - since) // DAY
        if not 0 <= i < days:
            continue
        day = counts[i]
        if kind == "thumbs":
            if value > 0:
                day.thumbs_up += 1
            else:
                day.thumbs_down += 1
            up_down = thumbs.setdefault(version or "base", {}).setdefault(i, [0, 0])
            up_down[0 if value > 0 else 1] += 1
        elif kind == "pick":
            day.picks += 1
        else:
            day.edits += 1
    series = [
        RateSeries(
            version=version,
            points=[
                RatePoint(t=since + i * DAY, up=up, down=down, rate=up / (up + down))
                for i, (up, down) in sorted(buckets.items())
            ],
        )
        for version, buckets in sorted(thumbs.items())
    ]
    return counts, series


def overview(
    db: Database, *, days: int, tenant: str | None, segment_tenants: dict[str, str]
) -> Overview:
    """The last `days` whole UTC days, today included. `tenant`: only that tenant's (None:
    every tenant's, an admin's view)."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    since = today - (days - 1) * DAY
    pending = select(PreferencePair.kind, func.count()).where(PreferencePair.status == "pending")
    if tenant is not None:
        pending = pending.where(PreferencePair.tenant == tenant)
    last = select(TrainingRun).where(*run_scope(segment_tenants, tenant))
    last = last.order_by(col(TrainingRun.created_at).desc()).limit(1)
    with Session(db) as session:
        feedback, thumbs = _per_day(_votes(session, since, tenant), since, days)
        waiting = dict(session.exec(pending.group_by(PreferencePair.kind)).all())
        run = session.exec(last).first()
    return Overview(
        since=since,
        days=days,
        feedback_per_day=feedback,
        thumbs_rate=thumbs,
        pending_pairs=waiting.get("pair", 0),
        pending_unpaired=waiting.get("unpaired", 0),
        last_run=run,
    )
