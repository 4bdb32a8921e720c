"""Durable feedback writes per second through the real HTTP API, against the 1,000/s target.

    .venv/bin/python bench/feedback.py [--client wrk python] [--concurrency 32] [--seconds 10]
                                       [--writes 4000] [--sync FULL NORMAL] [--auth off keys]

Starts `python -m service serve` (SmolLM2 on the CPU, a fresh SQLite file per run, log level
warning, so no access log), creates 50 short completions through the chat API (max_tokens 1),
then posts thumbs from many concurrent clients, each with its own user id (every write is a new
row). A 201 means committed; any other answer fails the run. One server per `synchronous`
setting and client, run one after the other, so the numbers sit side by side. Prints writes/s,
p50/p99 latency and the ratio to the target per run. Client and server share the machine's cores.

Clients: `wrk` (Debian package `wrk`; C, so it leaves the server most of the CPU; runs for
`--seconds`) and this script's own httpx client (`--writes` posts; Python, it needs about a core
itself). The default is wrk when it is installed, else the Python client.

`--auth off keys` runs each setting in development mode (no keys) and with API keys (every
request carries a user key: the key check and the rate limiter, limits set high), side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import pct  # noqa: E402
from service.engines.modelprep import prepare_default_model  # noqa: E402
from tests.servers import free_port, wait_ready  # noqa: E402

TARGET = 1000  # durable writes/s (issue #3)

# wrk's script: thumbs on the completions named in its arguments, a new user id per request
# (prefix, wrk thread, counter), and a JSON summary line at the end.
WRK_SCRIPT = r"""
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
function init(args)
  ids = {}
  for id in string.gmatch(args[1], "[^,]+") do table.insert(ids, id) end
  prefix, n = args[2], 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if args[3] ~= nil and args[3] ~= "" then wrk.headers["Authorization"] = "Bearer " .. args[3] end
end
function request()
  n = n + 1
  local body = string.format('{"completion_id":"%s","rating":1,"user":"%s-%d-%d"}',
    ids[n % #ids + 1], prefix, tid, n)
  return wrk.format(nil, "/v1/feedback", nil, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"seconds":%f,"non_2xx":%d,"socket_errors":%d,"p50":%f,"p99":%f}\n',
    summary.requests, summary.duration / 1e6, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1e6, latency:percentile(99) / 1e6))
end
"""


def completions(base_url: str, headers: dict[str, str]) -> list[str]:
    ids = []
    with httpx.Client(base_url=base_url, timeout=60, headers=headers) as http:
        for i in range(50):
            r = http.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": f"Say a word, {i}."}],
                    "max_tokens": 1,
                },
            )
            r.raise_for_status()
            ids.append(r.json()["id"])
    return ids


def run_wrk(
    base_url: str, ids: list[str], seconds: int, concurrency: int, tmp: Path, secret: str = ""
) -> tuple[float, float, float]:
    """writes/s, p50 and p99 seconds, measured by wrk after a 2 s warm-up."""
    script = tmp / "thumbs.lua"
    script.write_text(WRK_SCRIPT)

    def wrk(duration: int, prefix: str) -> dict:
        cmd = ["wrk", "-t2", f"-c{concurrency}", f"-d{duration}s", "-s", str(script), base_url]
        out = subprocess.run(
            [*cmd, "--", ",".join(ids), prefix, secret],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        assert result["non_2xx"] == result["socket_errors"] == 0, out
        return result

    wrk(2, "warm")
    r = wrk(seconds, "user")
    return r["requests"] / r["seconds"], r["p50"], r["p99"]


async def run_python(
    base_url: str, ids: list[str], writes: int, concurrency: int, headers: dict[str, str]
) -> tuple[float, float, float]:
    """writes/s, p50 and p99 seconds, measured by an httpx client in this process."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=60, limits=limits, headers=headers
    ) as http:
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
        elapsed = time.perf_counter() - t0
    return len(latencies) / elapsed, pct(latencies, 50), pct(latencies, 99)


def serve(
    sync: str, tmp: Path, model_dir: Path, name: str, auth: str = "off"
) -> tuple[subprocess.Popen, str, str]:
    """A server on a fresh database; with keys, also a user key's secret."""
    port = free_port()
    db_url = f"sqlite:///{tmp / f'bench-{name}.db'}"
    secret = ""
    if auth == "keys":
        from sqlalchemy import create_engine

        from service.auth import create_key
        from service.storage.db import init_db

        db = create_engine(db_url)
        init_db(db)
        _row, secret = create_key(db, name="bench")
        db.dispose()
    env = {
        **os.environ,
        "PREFLOOP_MODEL": str(model_dir),
        "PREFLOOP_DATABASE_URL": db_url,
        "PREFLOOP_AUTH": auth,
        "PREFLOOP_RATE_LIMIT_REQUESTS_PER_MINUTE": "0",
        "PREFLOOP_RATE_LIMIT_TOKENS_PER_MINUTE": "0",
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
        stderr=open(tmp / f"server-{name}.log", "wb"),  # noqa: SIM115
    )
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url, proc=proc)
    return proc, base_url, secret


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    have_wrk = shutil.which("wrk") is not None
    parser.add_argument(
        "--client", nargs="+", choices=["wrk", "python"], default=["wrk" if have_wrk else "python"]
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=10, help="wrk: how long to post")
    parser.add_argument("--writes", type=int, default=4000, help="python: how many posts")
    parser.add_argument("--sync", nargs="+", default=["FULL", "NORMAL"])
    parser.add_argument("--auth", nargs="+", choices=["off", "keys"], default=["off"])
    args = parser.parse_args()
    if "wrk" in args.client and not have_wrk:
        parser.error("wrk is not installed (Debian: apt-get install wrk)")
    model_dir = prepare_default_model(
        Path(os.environ.get("PREFLOOP_HOME", "~/.cache/prefloop")).expanduser() / "models",
        progress=False,
    )
    print(
        f"thumbs writes, {args.concurrency} concurrent clients, {os.cpu_count()} cores; "
        f"target {TARGET} durable writes/s"
    )
    print(
        f"{'synchronous':<12} {'client':<7} {'auth':<5} {'writes/s':>9} {'p50 ms':>8} "
        f"{'p99 ms':>8} target"
    )
    with tempfile.TemporaryDirectory() as d:
        for sync in args.sync:
            for client in args.client:
                for auth in args.auth:
                    name = f"{sync}-{client}-{auth}"
                    proc, base_url, secret = serve(sync, Path(d), model_dir, name, auth)
                    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
                    try:
                        ids = completions(base_url, headers)
                        if client == "wrk":
                            rate, p50, p99 = run_wrk(
                                base_url, ids, args.seconds, args.concurrency, Path(d), secret
                            )
                        else:
                            rate, p50, p99 = asyncio.run(
                                run_python(base_url, ids, args.writes, args.concurrency, headers)
                            )
                    finally:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(timeout=30)
                    print(
                        f"{sync:<12} {client:<7} {auth:<5} {rate:>9.0f} {p50 * 1000:>8.1f} "
                        f"{p99 * 1000:>8.1f} {rate / TARGET:.2f}x"
                    )


if __name__ == "__main__":
    main()
