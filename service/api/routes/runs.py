"""Operator API for refresh runs: start one, watch it (steps, training progress, log), cancel."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session, col, select

from adapters.registry import check_segment
from service.api.deps import DbDep, OperatorDep, actor
from service.api.schemas import RunDetail, RunList, RunPublic, StartRun
from service.core.errors import ConflictError, NotFoundError
from service.core.identity import Principal
from service.loop.runs import FINISHED, get_run, request_cancel
from service.overview import run_scope
from service.storage.tables import TrainingRun

router = APIRouter(prefix="/v1/operator", tags=["runs"])
STATUSES = ("queued", "running", *FINISHED)


def _visible(request: Request, operator: Principal, segment: str) -> bool:
    """Runs belong to their segment's tenant; other tenants' runs do not exist for a caller."""
    return operator.sees_tenant(request.app.state.settings.tenant_of(segment))


@router.post("/runs", response_model=RunPublic, status_code=202)
async def start_run(
    request: Request, operator: OperatorDep, body: StartRun | None = None
) -> RunPublic:
    """Start a refresh now (compile, train, evaluate, gate, promote); returns at once."""
    segment = body.segment if body else "default"
    check_segment(segment)  # a bad name is a 400
    if not _visible(request, operator, segment):
        raise NotFoundError(f"segment {segment!r} not found", param="segment")
    run = await run_in_threadpool(
        request.app.state.refresher.start, segment, trigger="api", actor=actor(operator)
    )
    return RunPublic.model_validate(run)


@router.get("/runs", response_model=RunList)
async def list_runs(
    request: Request,
    db: DbDep,
    operator: OperatorDep,
    segment: str | None = None,
    status: Literal["queued", "running", "succeeded", "skipped", "failed", "cancelled"]
    | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> RunList:
    """Runs, newest first."""

    def query() -> list[TrainingRun]:
        tenants = request.app.state.settings.segment_tenants
        q = select(TrainingRun).where(*run_scope(tenants, operator.scope))
        if segment is not None:
            q = q.where(TrainingRun.segment == segment)
        if status is not None:
            q = q.where(TrainingRun.status == status)
        q = q.order_by(col(TrainingRun.created_at).desc()).offset(offset).limit(limit + 1)
        with Session(db) as s:
            return list(s.exec(q).all())

    rows = await run_in_threadpool(query)
    return RunList(
        data=[RunPublic.model_validate(r) for r in rows[:limit]], has_more=len(rows) > limit
    )


@router.get("/runs/{run_id}", response_model=RunDetail)
async def show_run(request: Request, run_id: str, db: DbDep, operator: OperatorDep) -> RunDetail:
    run = await run_in_threadpool(get_run, db, run_id)
    if run is None or not _visible(request, operator, run.segment):
        raise NotFoundError(f"no refresh run {run_id!r}")
    return RunDetail.model_validate(run)


@router.post("/runs/{run_id}/cancel", response_model=RunPublic)
async def cancel_run(request: Request, run_id: str, db: DbDep, operator: OperatorDep) -> RunPublic:
    """Stop a queued or running refresh (its training subprocess is terminated within a
    second); the active adapter is untouched."""
    found = await run_in_threadpool(get_run, db, run_id)
    if found is None or not _visible(request, operator, found.segment):
        raise NotFoundError(f"no refresh run {run_id!r}")
    run = await run_in_threadpool(request_cancel, db, run_id)
    if run is None:
        raise NotFoundError(f"no refresh run {run_id!r}")
    if run.status in FINISHED:
        raise ConflictError(f"run {run_id} already finished ({run.status})", code="run_finished")
    return RunPublic.model_validate(run)


@router.get("/schedule")
async def get_schedule(request: Request, operator: OperatorDep) -> dict:
    """When the scheduled and threshold refreshes will next run in this process (empty when
    PREFLOOP_REFRESH_ENABLED is false), and what is running now (if it is the operator's
    tenant's)."""
    refresher = request.app.state.refresher
    jobs = refresher.scheduler.get_jobs() if refresher.scheduler is not None else []
    settings = request.app.state.settings
    running = refresher.current
    if running is not None:
        run = await run_in_threadpool(get_run, request.app.state.db, running)
        if run is None or not operator.sees_tenant(settings.tenant_of(run.segment)):
            running = None
    return {
        "enabled": refresher.scheduler is not None,
        "cron": settings.refresh_cron,
        "timezone": settings.refresh_timezone,
        "threshold_pairs": settings.refresh_threshold_pairs,
        "jobs": {j.id: j.next_run_time.isoformat() if j.next_run_time else None for j in jobs},
        "running": running,
    }
