"""The serving engine a process builds from its settings, its start-up, and the pause around a
refresh's GPU work."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from service.core.config import Settings
from service.engines.base import Engine

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


async def start_engine(app: Any, settings: Settings) -> None:
    """Load the model and the configured adapters into `app.state.engine`, then the active
    versions; a failure is kept in `app.state.engine_error` for /readyz."""
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


def engine_asleep(engine: Any, loop: asyncio.AbstractEventLoop) -> Any:
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
