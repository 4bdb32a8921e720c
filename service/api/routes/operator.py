"""The operator queue. Every route sits behind `OperatorDep` (an operator key; each sees its
tenant's feedback and pairs only)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BeforeValidator

from service.api.deps import DbDep, OperatorDep, SettingsDep, actor
from service.api.schemas import (
    BulkPairAction,
    CompileRequest,
    CompileSummary,
    DayCount,
    FeedbackList,
    FeedbackQueueItem,
    Overview,
    PairAction,
    PairActionName,
    PairActionResult,
    PairList,
    PairPublic,
    RatePoint,
    RateSeries,
    RunPublic,
    ThumbsRate,
    UserDeleted,
)
from service.core.errors import InvalidRequestError, NotFoundError
from service.feedback import compile_and_store
from service.overview import overview
from service.privacy import delete_user
from service.review import (
    ActionTaken,
    QueueEntry,
    act_on_pairs,
    list_feedback,
    list_pairs,
    thumbs_rate,
)
from service.review import RateSeries as Series

router = APIRouter(prefix="/v1/operator", tags=["operator"])

TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


def _iso_time(v: object) -> object:
    # Pydantic would take "403" for a Unix time; the schema (and a reader) says ISO 8601.
    if isinstance(v, str) and v.strip().lstrip("-").replace(".", "", 1).isdigit():
        raise ValueError("use an ISO 8601 time, e.g. 2026-01-31T12:00:00Z")
    return v


Time = Annotated[datetime, BeforeValidator(_iso_time)]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=2**31)]


@router.get("/feedback", response_model=FeedbackList)
async def get_feedback(
    db: DbDep,
    operator: OperatorDep,
    kind: Literal["thumbs", "pick", "edit"] | None = None,
    rating: Annotated[
        int | None, Query(description="1 or -1", json_schema_extra={"enum": [1, -1]})
    ] = None,
    user: str | None = None,
    segment: str | None = None,
    adapter_version: Annotated[str | None, Query(description='a version id, or "base"')] = None,
    has_comment: bool | None = None,
    since: Time | None = None,
    until: Time | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> FeedbackList:
    """Feedback, newest first, with the answer each is about. `rating` implies thumbs;
    `since`/`until` bound the vote time."""
    if rating not in (None, 1, -1):
        raise InvalidRequestError("rating must be 1 or -1", param="rating")
    page = await run_in_threadpool(
        lambda: list_feedback(
            db,
            kind=kind,
            rating=rating,
            user=user,
            segment=segment,
            adapter_version=adapter_version,
            has_comment=has_comment,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
            tenant=operator.scope,
        )
    )
    return FeedbackList(data=[_queue_item(e) for e in page.items], has_more=page.has_more)


def _queue_item(entry: QueueEntry) -> FeedbackQueueItem:
    return FeedbackQueueItem.from_row(
        entry.feedback,
        segment=entry.segment,
        adapter_version=entry.adapter_version,
        prompt=entry.prompt,
        answer=entry.answer,
    )


@router.get("/pairs", response_model=PairList)
async def get_pairs(
    db: DbDep,
    operator: OperatorDep,
    status: Literal["pending", "approved", "excluded", "used"] | None = None,
    source: Literal["regenerate", "thumbs", "pick", "edit"] | None = None,
    segment: str | None = None,
    kind: Literal["pair", "unpaired"] | None = None,
    since: Time | None = None,
    until: Time | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> PairList:
    """Stored pairs and KTO rows, newest first."""
    page = await run_in_threadpool(
        lambda: list_pairs(
            db,
            status=status,
            source=source,
            segment=segment,
            kind=kind,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
            tenant=operator.scope,
        )
    )
    return PairList(data=[_pair(r) for r in page.items], has_more=page.has_more)


def _pair(row: object) -> PairPublic:
    return PairPublic.model_validate(row, from_attributes=True)


@router.post("/pairs/compile", response_model=CompileSummary)
async def compile_pairs(
    db: DbDep, settings: SettingsDep, operator: OperatorDep, body: CompileRequest | None = None
) -> CompileSummary:
    """Compile new pairs from the stored feedback now (the scheduler does the same). An
    operator compiles, and sees the counts of, its own tenant's signals only."""
    who = actor(operator, body.operator if body else None)
    summary = await run_in_threadpool(
        lambda: compile_and_store(db, settings, actor=who, tenant=operator.scope)
    )
    return CompileSummary(**asdict(summary))


@router.post("/pairs/actions", response_model=PairActionResult)
async def bulk_pair_action(
    body: BulkPairAction, db: DbDep, operator: OperatorDep
) -> PairActionResult:
    """One action on many pairs, all or nothing: approve, exclude, flip, replace_chosen."""
    taken = await run_in_threadpool(
        lambda: act_on_pairs(
            db,
            action=body.action,
            ids=body.ids,
            text=body.text,
            actor=actor(operator, body.operator),
            tenant=operator.scope,
        )
    )
    return _action_result(taken)


def _action_result(taken: ActionTaken) -> PairActionResult:
    data = [_pair(r) for r in taken.pairs]
    return PairActionResult(id=taken.id, action=taken.action, actor=taken.actor, data=data)


@router.post("/pairs/{pair_id}/{action}", response_model=PairActionResult)
async def pair_action(
    pair_id: str,
    action: PairActionName,
    db: DbDep,
    operator: OperatorDep,
    body: PairAction | None = None,
) -> PairActionResult:
    """One action on one pair (`replace_chosen` takes `{"text": ...}`)."""
    body = body or PairAction()
    taken = await run_in_threadpool(
        lambda: act_on_pairs(
            db,
            action=action,
            ids=[pair_id],
            text=body.text,
            actor=actor(operator, body.operator),
            tenant=operator.scope,
        )
    )
    return _action_result(taken)


@router.get("/stats/thumbs", response_model=ThumbsRate)
async def get_thumbs_rate(
    db: DbDep,
    operator: OperatorDep,
    request: Request,
    segment: str | None = None,
    since: Time | None = None,
    bucket_seconds: Annotated[int, Query(ge=1, le=86_400 * 31)] = 3600,
) -> ThumbsRate:
    """Thumbs-up rate per adapter version over time (the console's live chart); `since`
    defaults to seven days ago."""
    settings = request.app.state.settings
    if segment is not None and not operator.sees_tenant(settings.tenant_of(segment)):
        raise NotFoundError(f"segment {segment!r} not found", param="segment")
    # Another tenant's adapter versions and votes stay out of this operator's chart.
    visible = [s for s in settings.segments if operator.sees_tenant(settings.tenant_of(s))]
    if len(visible) == len(settings.segments):
        visible = None  # every segment, also ones no longer configured
    since = since or datetime.now(UTC) - timedelta(days=7)
    since = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
    series = await run_in_threadpool(
        lambda: thumbs_rate(
            db, segment=segment, since=since, bucket_seconds=bucket_seconds, visible=visible
        )
    )
    data = [_series(s) for s in series]
    return ThumbsRate(segment=segment, bucket_seconds=bucket_seconds, since=since, data=data)


def _series(s: Series) -> RateSeries:
    return RateSeries(version=s.version, points=[RatePoint(**asdict(p)) for p in s.points])


@router.get("/overview", response_model=Overview)
async def get_overview(
    db: DbDep,
    settings: SettingsDep,
    operator: OperatorDep,
    days: Annotated[int, Query(ge=1, le=90, description="whole UTC days, today included")] = 14,
) -> Overview:
    """The console's landing numbers: feedback per day, the thumbs-up rate of each adapter
    version per day, pairs waiting for review and the last refresh with its verdict; the
    operator's tenant's only."""
    o = await run_in_threadpool(
        lambda: overview(
            db, days=days, tenant=operator.scope, segment_tenants=settings.segment_tenants
        )
    )
    return Overview(
        since=o.since,
        days=o.days,
        feedback_per_day=[DayCount(**asdict(d)) for d in o.feedback_per_day],
        thumbs_rate=[_series(s) for s in o.thumbs_rate],
        pending_pairs=o.pending_pairs,
        pending_unpaired=o.pending_unpaired,
        last_run=RunPublic.model_validate(o.last_run) if o.last_run is not None else None,
    )


@router.delete("/users/{user_id}", response_model=UserDeleted)
async def delete_user_data(
    user_id: Annotated[str, Path(max_length=256)],
    db: DbDep,
    operator: OperatorDep,
    tenant: Annotated[str | None, Query(pattern=TENANT_PATTERN, description="admins only")] = None,
) -> UserDeleted:
    """Delete a user's conversations, feedback and the pairs compiled from them, and keep
    everything they send later out of training (a tombstone). Operators: their own tenant's
    users; admins: any tenant's (`tenant`, default `default`)."""
    tenant = tenant or operator.tenant
    if not operator.sees_tenant(tenant):
        raise NotFoundError(f"tenant {tenant!r} not found", param="tenant")
    counts = await run_in_threadpool(
        lambda: delete_user(db, user_id=user_id, tenant=tenant, actor=actor(operator))
    )
    return UserDeleted(user=user_id, tenant=tenant, **counts)
