"""The FastAPI application."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from fastapi import Depends, FastAPI
from sqlmodel import Session

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
from service.core.db import GroupCommit, init_db, make_engine
from service.core.errors import install_error_handlers
from service.engines.base import Engine
from service.engines.routing import AdapterRouter
from service.loop.scheduler import Refresher
from service.observability import RequestMiddleware, build_registry

log = logging.getLogger(__name__)


def build_engine(settings: Settings) -> Engine:
    from service.engines.modelprep import default_model_dir

    if settings.engine == "vllm":
        from service.engines.vllm import VLLMEngine

        return VLLMEngine(
            settings.vllm_urls,
            model_name=settings.model_name,
            # The gateway tokenizes too (context checks): it needs the model's tokenizer files.
            tokenizer_path=settings.model or str(default_model_dir(settings.models_dir)),
            upstream_model=settings.vllm_model,
            adapter_path_map=(str(settings.adapters_dir), settings.vllm_adapters_path)
            if settings.vllm_adapters_path
            else None,
            connect_timeout=settings.vllm_connect_timeout_seconds,
            read_timeout=settings.vllm_read_timeout_seconds,
            max_connections=settings.vllm_max_connections,
            max_queue=settings.max_queue,
            health_seconds=settings.vllm_health_seconds,
            sleep_retry_after=settings.vllm_sleep_retry_after_seconds,
            check_sleeping=settings.vllm_sleep_during_refresh,
        )
    from service.engines.local import LocalEngine

    return LocalEngine(
        settings.model or str(default_model_dir(settings.models_dir)),
        model_name=settings.model_name,
        device=settings.device,
        dtype=settings.dtype,
        max_queue=settings.max_queue,
        max_batch=settings.max_batch,
        torch_threads=settings.torch_threads,
    )


async def _watch(app: FastAPI, settings: Settings) -> None:
    """The live watch: roll back a promoted version whose thumbs-up rate dropped; then one look
    at every running canary (promote, roll back, stop or continue). Every replica runs it: the
    registry's fences and the experiments' conditional updates let one of them act."""
    from service.loop.canary import RUNNING, decide_all
    from service.loop.lifecycle import watch_once

    state = app.state
    while True:
        await asyncio.sleep(settings.watch_interval_seconds)
        try:
            results = await asyncio.to_thread(watch_once, state.db, state.registry, settings)
            looks = await asyncio.to_thread(decide_all, state.db, state.registry)
        except Exception:  # noqa: BLE001 - try again next interval
            log.exception("the live watch failed")
            continue
        if any(r.verdict.rollback for r in results) or any(e.status != RUNNING for e in looks):
            state.router.kick()


async def _start_engine(app: FastAPI, settings: Settings) -> None:
    from service.engines.modelprep import prepare_default_model

    engine = app.state.engine
    try:
        if settings.uses_default_model:  # instant when `prefloop serve` prepared it already
            await asyncio.to_thread(prepare_default_model, settings.models_dir, progress=False)
        await engine.start()
        for name, path in settings.lora_adapters.items():
            await engine.load_adapter(name, path)
        await app.state.router.sync()  # the active versions, before /readyz says ready
        # What exists now (torch, transformers, the model: ~450k objects) lives as long as the
        # process: take it out of the cyclic collector's sight. Otherwise every full collection
        # walks all of it, a 0.1-0.3 s pause every ~2 s under feedback load (p99 ~0.3 s).
        gc.collect()
        gc.freeze()
        log.info("ready: serving %s (adapters: %s)", engine.model_name, engine.adapters())
    except Exception as exc:
        app.state.engine_error = f"{type(exc).__name__}: {exc}"
        log.exception("the model failed to load; /readyz reports why")


async def _poll(app: FastAPI) -> None:
    while not app.state.engine.is_ready():  # adapters load once the model has
        await asyncio.sleep(0.05)
    await app.state.router.run()


def _engine_asleep(engine: Any, loop: asyncio.AbstractEventLoop) -> Any:
    """A refresh (on its worker thread) puts this gateway's vLLM fleet to sleep: new requests
    get 503 + Retry-After at once, running ones finish, then vLLM sleeps; it wakes afterwards
    whether training succeeded or failed."""

    @contextmanager
    def guard() -> Iterator[None]:
        asyncio.run_coroutine_threadsafe(engine.sleep(), loop).result()
        try:
            yield
        finally:
            asyncio.run_coroutine_threadsafe(engine.wake(), loop).result()

    return guard


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


def _sweep_interrupted(db: Any, settings: Settings) -> None:
    """What a crash (SIGKILL, power cut) left unfinished: refresh runs and answers."""
    from datetime import timedelta

    from service.loop.refresh import sweep_interrupted
    from service.storage.models import utcnow
    from service.storage.turns import sweep_interrupted_completions

    sweep_interrupted(db, settings.refresh_lease_seconds)
    with Session(db) as session:
        older = utcnow() - timedelta(minutes=settings.interrupted_after_minutes)
        if n := sweep_interrupted_completions(session, older):
            log.warning("marked %d interrupted completion(s) failed", n)
        session.commit()


async def _purge(settings: Settings, db) -> None:  # noqa: ANN001 - the database engine
    """Delete conversations older than the retention period, every retention_check_minutes."""
    from service.privacy import purge_expired

    while True:
        try:
            await asyncio.to_thread(purge_expired, db, settings)
        except Exception:  # noqa: BLE001 - try again next time
            log.exception("the retention purge failed")
        await asyncio.sleep(settings.retention_check_minutes * 60)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app. `engine` lets a caller share an already started engine (benchmarks)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.db = make_engine(settings)
        await asyncio.to_thread(init_db, app.state.db, auto_upgrade=settings.db_auto_upgrade)
        await asyncio.to_thread(_sweep_interrupted, app.state.db, settings)
        app.state.writer = GroupCommit(app.state.db)
        app.state.keys = KeyStore(app.state.db, ttl=settings.auth_cache_seconds)
        app.state.metrics = build_registry(app.state.db, settings.metrics_cache_seconds)
        app.state.engine_error = None
        app.state.engine = engine or build_engine(settings)
        app.state.registry = Registry(app.state.db, settings.adapters_dir)
        app.state.router = AdapterRouter(
            app.state.engine,
            app.state.registry,
            poll_seconds=settings.adapter_poll_seconds,
            segments=tuple(settings.segments),
        )
        # Load in the background: /healthz answers at once, /readyz once the model is loaded.
        tasks = []
        if not app.state.engine.is_ready():
            tasks.append(asyncio.create_task(_start_engine(app, settings)))
        else:
            tasks.append(asyncio.create_task(app.state.router.sync()))
        tasks.append(asyncio.create_task(_poll(app)))
        if settings.watch_interval_seconds > 0:
            tasks.append(asyncio.create_task(_watch(app, settings)))
        if settings.retention_days > 0:
            tasks.append(asyncio.create_task(_purge(settings, app.state.db)))
        loop = asyncio.get_running_loop()
        app.state.refresher = Refresher(
            settings,
            app.state.db,
            app.state.registry,
            on_promote=lambda: loop.call_soon_threadsafe(app.state.router.kick),
            gpu_guard=_engine_asleep(app.state.engine, loop)
            if settings.engine == "vllm" and settings.vllm_sleep_during_refresh
            else None,
        )
        if settings.refresh_enabled:
            app.state.refresher.start_schedule()
        try:
            yield
        finally:
            await asyncio.to_thread(app.state.refresher.shutdown)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if engine is None:
                await app.state.engine.aclose()
            else:  # a shared engine: give back what this app loaded into it
                await app.state.router.release_all()
            app.state.writer.close()
            app.state.db.dispose()

    app = FastAPI(
        title="prefloop",
        summary="A chat model service that learns from its own users.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.request_limiter = RateLimiter(settings.rate_limit_requests_per_minute)
    app.state.visitors = VisitorIds(visitor_secret(settings.visitor_secret, settings.home_dir))
    app.state.visitor_limiter = RateLimiter(settings.rate_limit_visitor_requests_per_minute)
    app.state.address_limiter = RateLimiter(settings.rate_limit_address_requests_per_minute)
    app.state.new_visitor_limiter = RateLimiter(settings.new_visitors_per_address_per_hour, 3600)
    app.state.token_limiter = RateLimiter(settings.rate_limit_tokens_per_minute)
    check_auth_mode(settings)

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
    app.include_router(health.router, responses=error_responses(503))
    for api in (models, chat, feedback, operator, adapters, runs, experiments):
        app.include_router(
            api.router, responses=V1_ERRORS, dependencies=[Depends(reject_unknown_query)]
        )
    app.include_router(web.router)
    app.mount("/web", web.static, name="web")
    return app
