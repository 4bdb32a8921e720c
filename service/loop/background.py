"""What a serving process runs beside its requests: the start-up sweep of work a crash left
unfinished, and the loops (adapter routes kept in step with the registry, the live watch, the
retention purge). `start` begins the loops as tasks, `stop` ends them."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from sqlalchemy.engine import Engine as Database
from sqlmodel import Session

from service.core.config import Settings
from service.engines.base import Engine
from service.engines.routing import AdapterRouter
from service.loop import live_watch
from service.loop.runs import sweep_interrupted as sweep_interrupted_runs
from service.privacy import purge_expired
from service.storage.tables import utcnow
from service.storage.turns import sweep_interrupted_completions

log = logging.getLogger(__name__)


def sweep_interrupted(db: Database, settings: Settings) -> None:
    """What a crash (SIGKILL, power cut) left unfinished: refresh runs and answers."""
    sweep_interrupted_runs(db, settings.refresh_lease_seconds)
    with Session(db) as session:
        older = utcnow() - timedelta(minutes=settings.interrupted_after_minutes)
        if n := sweep_interrupted_completions(session, older):
            log.warning("marked %d interrupted completion(s) failed", n)
        session.commit()


def start(state: Any, settings: Settings) -> list[asyncio.Task]:
    """The loops, on the app's state (its db, registry, engine and router)."""
    tasks = [asyncio.create_task(poll_adapters(state.engine, state.router))]
    if settings.watch_interval_seconds > 0:
        watch = live_watch.run(state.db, state.registry, state.router, settings)
        tasks.append(asyncio.create_task(watch))
    if settings.retention_days > 0:
        tasks.append(asyncio.create_task(purge(settings, state.db)))
    return tasks


async def stop(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def poll_adapters(engine: Engine, router: AdapterRouter) -> None:
    """Keep the routes in step with the registry's active versions (`AdapterRouter.run`)."""
    while not engine.is_ready():  # adapters load once the model has
        await asyncio.sleep(0.05)
    await router.run()


async def purge(settings: Settings, db: Database) -> None:
    """Delete conversations older than the retention period, every retention_check_minutes."""
    while True:
        try:
            await asyncio.to_thread(purge_expired, db, settings)
        except Exception:  # noqa: BLE001 - try again next time
            log.exception("the retention purge failed")
        await asyncio.sleep(settings.retention_check_minutes * 60)
