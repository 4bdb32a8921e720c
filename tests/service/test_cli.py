"""`prefloop serve` hands the settings to uvicorn."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from service.cli import serve


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
    serve.get_settings.cache_clear()
    try:
        assert serve.run(argparse.Namespace(host=None, port=None)) == 0
    finally:
        serve.get_settings.cache_clear()
    assert seen["access_log"] is expected


def test_serve_refuses_a_busy_port_before_loading_anything(tmp_path) -> None:
    """A second `prefloop serve` on a taken port fails at once with what to do, not after the
    model has loaded."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The default model: were the check after the model preparation, this would take minutes.
        env = {**os.environ, "PREFLOOP_HOME": str(tmp_path), "PREFLOOP_PORT": str(port)}
        env.pop("PREFLOOP_MODEL", None)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "--port" in done.stderr and "PREFLOOP_PORT" in done.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "models").exists()  # nothing was prepared
