"""The FastAPI application: `create_app` assembles it, its lifespan opens the database, builds the
engine and the router, and starts the background loops (`service.loop.background`) and the
refresh scheduler (`service.loop.scheduler`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from adapters.registry import Registry
from service.api.deps import reject_unknown_query
from service.api.middleware import BodyLimit, JsonBody, KeyCors
from service.api.protocol import V1_ERRORS, error_responses
from service.api.routes import (
    adapters,
    chat,
    experiments,
    feedback,
    health,
    models,
    operator,
    runs,
    web,
)
from service.auth import KeyStore, RateLimiter, VisitorIds, visitor_secret
from service.core.config import Settings, get_settings
from service.core.errors import install_error_handlers
from service.engines.base import Engine
from service.engines.routing import AdapterRouter
from service.engines.startup import build_engine, engine_asleep, start_engine
from service.loop import background
from service.loop.scheduler import Refresher
from service.observability import RequestMiddleware, build_registry
from service.storage.db import GroupCommit, init_db, make_engine

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app. `engine` lets a caller share an already started engine (benchmarks)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="prefloop",
        summary="A chat model service that learns from its own users.",
        version="0.1.0",
        lifespan=_lifespan(settings, engine),
    )
    app.state.settings = settings
    _add_limiters(app, settings)
    check_auth_mode(settings)
    _add_middleware(app, settings)
    app.include_router(health.router, responses=error_responses(503))
    for api in (models, chat, feedback, operator, adapters, runs, experiments):
        app.include_router(
            api.router, responses=V1_ERRORS, dependencies=[Depends(reject_unknown_query)]
        )
    app.include_router(web.router)
    app.mount("/web", web.static, name="web")
    return app


def _lifespan(
    settings: Settings, shared: Engine | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        state.db = make_engine(settings)
        await asyncio.to_thread(init_db, state.db, auto_upgrade=settings.db_auto_upgrade)
        await asyncio.to_thread(background.sweep_interrupted, state.db, settings)
        state.writer = GroupCommit(state.db)
        state.keys = KeyStore(state.db, ttl=settings.auth_cache_seconds)
        state.metrics = build_registry(state.db, settings.metrics_cache_seconds)
        state.engine_error = None
        state.engine = shared or build_engine(settings)
        state.registry = Registry(state.db, settings.adapters_dir)
        state.router = AdapterRouter(
            state.engine,
            state.registry,
            poll_seconds=settings.adapter_poll_seconds,
            segments=tuple(settings.segments),
        )
        # Load in the background: /healthz answers at once, /readyz once the model is loaded.
        ready = state.router.sync() if state.engine.is_ready() else start_engine(app, settings)
        tasks = [asyncio.create_task(ready), *background.start(state, settings)]
        state.refresher = _refresher(state, settings)
        if settings.refresh_enabled:
            state.refresher.start_schedule()
        try:
            yield
        finally:
            await asyncio.to_thread(state.refresher.shutdown)
            await background.stop(tasks)
            if shared is None:
                await state.engine.aclose()
            else:  # a shared engine: give back what this app loaded into it
                await state.router.release_all()
            state.writer.close()
            state.db.dispose()

    return lifespan


def _refresher(state: Any, settings: Settings) -> Refresher:
    """Refreshes run on a worker thread; a promotion tells this process's router at once, and
    with vLLM's sleep mode a refresh pauses this gateway's fleet while it trains."""
    loop = asyncio.get_running_loop()
    return Refresher(
        settings,
        state.db,
        state.registry,
        on_promote=lambda: loop.call_soon_threadsafe(state.router.kick),
        gpu_guard=engine_asleep(state.engine, loop)
        if settings.engine == "vllm" and settings.vllm_sleep_during_refresh
        else None,
    )


def _add_limiters(app: FastAPI, settings: Settings) -> None:
    app.state.request_limiter = RateLimiter(settings.rate_limit_requests_per_minute)
    app.state.visitors = VisitorIds(visitor_secret(settings.visitor_secret, settings.home_dir))
    app.state.visitor_limiter = RateLimiter(settings.rate_limit_visitor_requests_per_minute)
    app.state.address_limiter = RateLimiter(settings.rate_limit_address_requests_per_minute)
    app.state.new_visitor_limiter = RateLimiter(settings.new_visitors_per_address_per_hour, 3600)
    app.state.token_limiter = RateLimiter(settings.rate_limit_tokens_per_minute)


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    def cors_origins() -> frozenset[str] | None:
        keys = getattr(app.state, "keys", None)
        if settings.auth == "off":
            return None
        return keys.public_origins() if keys is not None else frozenset()

    # The last added is outermost: CORS headers go on the body limit's 413s too.
    app.add_middleware(JsonBody)
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        uploads={adapters.UPLOAD_PATH: settings.max_upload_bytes},
    )
    app.add_middleware(KeyCors, allowed=cors_origins)
    install_error_handlers(app)
    app.add_middleware(RequestMiddleware)  # request ids, HTTP metrics (service/observability.py)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


class UnsafeConfigError(RuntimeError):
    """A configuration prefloop refuses to serve with."""


def check_auth_mode(settings: Settings) -> None:
    """Development mode (no keys) is loudly marked, and refused where strangers can reach it."""
    if settings.auth == "keys":
        return
    if settings.host not in LOOPBACK and not settings.host.startswith("127."):
        raise UnsafeConfigError(
            f"PREFLOOP_AUTH=off (development mode: no API keys, everyone is an admin) on host "
            f"{settings.host!r} would let anyone on the network read and change everything. "
            "Set PREFLOOP_AUTH=keys and create keys with `prefloop keys create`, or serve on "
            "127.0.0.1."
        )
    log.warning(
        "*** DEVELOPMENT MODE: no API keys (PREFLOOP_AUTH=off); every caller is an admin. "
        "Loopback only. Set PREFLOOP_AUTH=keys before exposing this service. ***"
    )
