"""`prefloop serve` hands the settings to uvicorn."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from service import cli


@pytest.mark.parametrize(("env", "expected"), [(None, True), ("false", False)])
def test_serve_passes_the_access_log_setting(
    monkeypatch: pytest.MonkeyPatch, env: str | None, expected: bool
) -> None:
    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    monkeypatch.setenv("PREFLOOP_MODEL", "stub-model")  # nothing to prepare
    if env is not None:
        monkeypatch.setenv("PREFLOOP_ACCESS_LOG", env)
    cli.get_settings.cache_clear()
    try:
        assert cli._serve(argparse.Namespace(host=None, port=None)) == 0
    finally:
        cli.get_settings.cache_clear()
    assert seen["access_log"] is expected
