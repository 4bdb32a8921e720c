"""A live gateway on a tiny random Llama, fresh database per test, for the feedback and operator
API tests: real HTTP through uvicorn in a thread, the engine shared across a module."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine
from sqlmodel import Session

from adapters.registry import APPROVED, Registry
from service.core.config import Settings
from service.main import create_app
from service.storage.db import make_engine
from tests.conftest import make_adapter
from tests.servers import serve_thread


@dataclass
class Live:
    base_url: str
    db_url: str
    http: httpx.Client
    model_dir: Path | None = None
    seed: int = 0

    def chat(self, messages: list[dict[str, str]] | None = None, **body: Any) -> dict[str, Any]:
        """A short sampled answer. The tiny model's text is random: each call gets its own seed,
        or two prompts could get the same text."""
        self.seed += 1
        payload = {"max_tokens": 6, "temperature": 1.0, "seed": self.seed, **body}
        if messages is not None:
            payload["messages"] = messages
        r = self.http.post("/v1/chat/completions", json=payload)
        assert r.status_code == 200, r.text
        return r.json()

    def feedback(self, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
        return self.http.post("/v1/feedback", json=body, headers=headers)

    def compile(self, operator: str = "ops") -> dict[str, Any]:
        r = self.http.post("/v1/operator/pairs/compile", headers={"X-Operator": operator})
        assert r.status_code == 200, r.text
        return r.json()

    def session(self) -> Session:
        return Session(create_engine(self.db_url))


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama_dir: Path) -> Iterator[Any]:
    from service.engines.local import LocalEngine

    engine = LocalEngine(str(tiny_llama_dir), model_name="tiny", max_queue=8)
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module (or with `pytest.mark.parametrize(..., indirect=True)`)."""
    return {}


@pytest.fixture
def live(
    tiny_engine: Any,
    tiny_llama_dir: Path,
    tmp_path: Path,
    settings_overrides: dict[str, Any],
    db_url: str,
) -> Iterator[Live]:
    # The engine is the module's: adapters an earlier test's refreshes loaded (one may finish
    # promoting while its server stops) must not be served in this one.
    for name in tiny_engine.adapters():
        asyncio.run(tiny_engine.unload_adapter(name))
    # No scheduler unless a test asks: its threshold check would compile pairs mid-test.
    overrides = {"refresh_enabled": False, **settings_overrides}
    settings = Settings(home=tmp_path, model=str(tiny_llama_dir), database_url=db_url, **overrides)
    with serve_thread(create_app(settings, engine=tiny_engine)) as base_url:
        with httpx.Client(base_url=base_url, timeout=30) as http:
            yield Live(base_url=base_url, db_url=db_url, http=http, model_dir=tiny_llama_dir)


# --- adapter versions beside a live gateway (canary tests) ----------------------------------
@pytest.fixture(scope="module")
def lora(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three real LoRA adapters of the tiny model, different weights each."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_llama_dir, root / f"a{i}", seed=300 + i) for i in range(3)]


@pytest.fixture
def registry(live: Live, tmp_path: Path) -> Iterator[Registry]:
    """The registry as another process (the CLI) sees it: the live app's database and files."""
    db = make_engine(Settings(database_url=live.db_url))
    yield Registry(db, tmp_path / "adapters")
    db.dispose()


def approved(registry: Registry, path: Path, segment: str = "default") -> str:
    """Register `path` and approve it as the gate would: a version a canary may start with."""
    vid = registry.register(path, segment=segment).id
    registry.transition(vid, APPROVED, actor="gate", reason="passed the gate")
    return vid
