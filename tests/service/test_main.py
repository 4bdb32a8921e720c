"""App start-up: what happens once the model has loaded."""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace

from service.core.config import Settings
from service.engines.startup import start_engine


class _Loaded:
    model_name = "stub"

    async def start(self) -> None:
        pass

    def adapters(self) -> list[str]:
        return []


class _Router:
    async def sync(self) -> None:
        pass


def test_objects_loaded_at_start_are_frozen_out_of_the_collector() -> None:
    """Full collections would otherwise walk the model's ~450k objects every ~2 s under load."""
    app = SimpleNamespace(state=SimpleNamespace(engine=_Loaded(), router=_Router()))
    gc.unfreeze()
    try:
        asyncio.run(start_engine(app, Settings(model="stub-model")))  # type: ignore[arg-type]
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
