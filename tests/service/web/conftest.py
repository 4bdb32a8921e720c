"""A real headless Chromium (Debian's package) driven by Playwright, for the widget and console
tests. Screenshots land in `artifacts/screenshots/` (git-ignored) at the repository root."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("PREFLOOP_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[3] / "artifacts" / "screenshots"
# As root, Chromium needs --no-sandbox; without the background-networking flags it keeps
# trying to reach Google's hosts, which this network refuses.
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _in_thread(coro: Any) -> Any:
    # Playwright's sync API keeps an event loop running in the main thread, so asyncio.run()
    # there fails: run the coroutine on a loop of its own in a worker thread.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama_dir: Path) -> Iterator[Any]:
    """tests/service/conftest.py's tiny engine, started beside Playwright's event loop."""
    from service.engines.local import LocalEngine

    engine = LocalEngine(str(tiny_llama_dir), model_name="tiny", max_queue=8)
    _in_thread(engine.start())
    yield engine
    _in_thread(engine.aclose())


# Per module, not per session: while Playwright runs, its event loop occupies the main thread
# and other modules' fixtures that call asyncio.run() would fail.
@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: `make test` installs Debian's (apt-get install "
            "chromium), or set PREFLOOP_TEST_CHROMIUM to another Chromium binary"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


class Shots:
    """Numbered screenshots for one test: artifacts/screenshots/<test>-<n>-<name>.png."""

    def __init__(self, page: object, test: str):
        self.page, self.n = page, 0
        self.prefix = re.sub(r"[^\w-]+", "_", test)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for old in SCREENSHOTS.glob(f"{self.prefix}-*.png"):
            old.unlink()

    def __call__(self, name: str) -> Path:
        self.n += 1
        path = SCREENSHOTS / f"{self.prefix}-{self.n:02d}-{name}.png"
        self.page.screenshot(path=path, full_page=True)  # type: ignore[attr-defined]
        return path


@pytest.fixture
def page(browser: object, request: pytest.FixtureRequest) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.shots = Shots(page, request.node.name)
    page.js_errors = errors
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
