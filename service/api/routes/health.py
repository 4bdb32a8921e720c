from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import text

from service.api.deps import DbDep, EngineDep
from service.core.errors import NotReadyError

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (it may still be loading the model)."""
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text format: this process's counters and the database's gauges."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    body = await run_in_threadpool(generate_latest, request.app.state.metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/readyz")
async def readyz(request: Request, engine: EngineDep, db: DbDep) -> dict[str, str]:
    """Ready for traffic: the model is loaded and the database answers."""
    if not engine.is_ready():
        reason = getattr(request.app.state, "engine_error", None)
        raise NotReadyError(
            f"the model failed to load: {reason}" if reason else "the model is still loading"
        )

    def ping() -> None:
        with db.connect() as conn:
            conn.execute(text("SELECT 1"))

    if not request.app.state.router.synced:
        raise NotReadyError("the active adapter versions are still loading")
    try:
        await run_in_threadpool(ping)
    except Exception as exc:
        raise NotReadyError(f"the database is unavailable: {type(exc).__name__}") from exc
    return {"status": "ready", "model": engine.model_name}
