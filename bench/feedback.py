"""Durable feedback writes per second through the real HTTP API.

    .venv/bin/python bench/feedback.py [--writes 4000] [--concurrency 32] [--sync FULL NORMAL]

Starts `python -m service serve` (SmolLM2 on the CPU, a fresh SQLite file per run), creates 50
short completions through the chat API (max_tokens 1), then posts thumbs from many concurrent
clients, each with its own user id (every write is a new row). A 201 means committed. One server
per `synchronous` setting, run one after the other, so the numbers sit side by side. Prints
writes/s and p50/p99 latency per setting. Client and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.modelprep import prepare_default_model  # noqa: E402
from tests.servers import free_port, wait_ready  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def run(base_url: str, writes: int, concurrency: int) -> tuple[float, list[float]]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:
        ids = []
        for i in range(50):
            r = await http.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": f"Say a word, {i}."}],
                    "max_tokens": 1,
                },
            )
            r.raise_for_status()
            ids.append(r.json()["id"])

        latencies: list[float] = []
        todo = iter(range(writes))

        async def client() -> None:
            for i in todo:
                body = {"completion_id": ids[i % len(ids)], "rating": 1, "user": f"user-{i}"}
                t0 = time.perf_counter()
                r = await http.post("/v1/feedback", json=body)
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 201, r.text

        # Warm-up (connections, first-call paths), not measured.
        warm = [
            http.post("/v1/feedback", json={"completion_id": ids[0], "rating": -1, "user": f"w{i}"})
            for i in range(concurrency)
        ]
        await asyncio.gather(*warm)
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies


def serve(sync: str, tmp: Path, model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "PREFLOOP_MODEL": str(model_dir),
        "PREFLOOP_DATABASE_URL": f"sqlite:///{tmp / f'bench-{sync}.db'}",
        "PREFLOOP_SQLITE_SYNCHRONOUS": sync,
        "PREFLOOP_PORT": str(port),
        "PREFLOOP_LOG_LEVEL": "warning",
        "PREFLOOP_TORCH_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve"],
        env=env,
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / f"server-{sync}.log", "wb"),  # noqa: SIM115
    )
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url, proc=proc)
    return proc, base_url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sync", nargs="+", default=["FULL", "NORMAL"])
    args = parser.parse_args()
    model_dir = prepare_default_model(
        Path(os.environ.get("PREFLOOP_HOME", "~/.cache/prefloop")).expanduser() / "models",
        progress=False,
    )
    print(
        f"{args.writes} thumbs writes, {args.concurrency} concurrent clients, "
        f"{os.cpu_count()} cores"
    )
    print(f"{'synchronous':<12} {'writes/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    with tempfile.TemporaryDirectory() as d:
        for sync in args.sync:
            proc, base_url = serve(sync, Path(d), model_dir)
            try:
                elapsed, lat = asyncio.run(run(base_url, args.writes, args.concurrency))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
            print(
                f"{sync:<12} {len(lat) / elapsed:>9.0f} {pct(lat, 50) * 1000:>8.1f} "
                f"{pct(lat, 99) * 1000:>8.1f}"
            )


if __name__ == "__main__":
    main()
