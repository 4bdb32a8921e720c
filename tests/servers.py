"""Real servers for tests: `prefloop serve` in a subprocess, or an app under uvicorn in a thread."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(
    base_url: str,
    timeout: float = 180,
    proc: subprocess.Popen | None = None,
    path: str = "/readyz",
) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(f"{base_url}{path}", timeout=2)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{base_url} not ready after {timeout}s: {last}")


@dataclass
class Server:
    base_url: str
    db_url: str
    log_path: Path | None = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""


@contextmanager
def serve_subprocess(env: dict[str, str], tmp: Path) -> Iterator[Server]:
    """`python -m service serve` with the given PREFLOOP_* environment, stopped with SIGTERM."""
    port = free_port()
    db_url = env.get("PREFLOOP_DATABASE_URL") or f"sqlite:///{tmp / 'prefloop.db'}"
    full_env = {
        **os.environ,
        "PREFLOOP_DATABASE_URL": db_url,
        "PREFLOOP_PORT": str(port),
        **env,
    }
    log_path = tmp / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(base_url, proc=proc)
        except Exception as exc:
            raise RuntimeError(f"{exc}\n--- server log ---\n{log_path.read_text()}") from exc
        yield Server(base_url=base_url, db_url=db_url, log_path=log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serve_thread(app, *, timeout: float = 120, ready: bool = True) -> Iterator[str]:
    """Run an ASGI app under uvicorn in a background thread (same process, real HTTP); wait
    until it is ready for traffic (or, with ready=False, only up)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, timeout=timeout, path="/readyz" if ready else "/healthz")
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
