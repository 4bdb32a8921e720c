from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import text

from service.api.deps import DbDep, EngineDep, KeysDep, SettingsDep, bearer_scheme
from service.core.errors import AuthenticationError, NotReadyError, PermissionDeniedError
from service.core.identity import Role

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (it may still be loading the model)."""
    return {"status": "ok"}


async def metrics_caller(
    request: Request,
    settings: SettingsDep,
    keys: KeysDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """`/metrics` says how much traffic and feedback each tenant's segments get: the metrics
    token (PREFLOOP_METRICS_TOKEN), else with keys on an admin key."""
    secret = credentials.credentials if credentials else ""
    if settings.metrics_token:
        if not hmac.compare_digest(secret.encode(), settings.metrics_token.encode()):
            raise AuthenticationError(
                "/metrics needs `Authorization: Bearer <PREFLOOP_METRICS_TOKEN>`"
            )
        return
    if settings.auth == "off":
        return
    principal = await run_in_threadpool(keys.lookup, secret) if secret else None
    if principal is None:
        raise AuthenticationError(
            "/metrics needs an admin key, or set PREFLOOP_METRICS_TOKEN for your scraper"
        )
    if principal.role < Role.admin:
        raise PermissionDeniedError("/metrics needs an admin key (or PREFLOOP_METRICS_TOKEN)")


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(metrics_caller)])
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
