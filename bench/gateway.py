"""Gateway overhead: the same chat request sent to the engine in-process vs through the gateway
(HTTP + validation + storage in SQLite + SSE/JSON), measured side by side in one run.

    .venv/bin/python bench/gateway.py [--requests 24] [--rounds 2] [--max-tokens 16]
    .venv/bin/python bench/gateway.py --engine vllm [--vllm-url http://127.0.0.1:8001]

Both sides run the real SmolLM2 on the CPU with greedy decoding, so they do the same model work;
the phases alternate (direct, gateway, direct, ...) so machine noise hits both alike. Prints
latency percentiles, the added latency per request, and throughput ratios at concurrency 1 and 8.

With ``--engine vllm`` "direct" is an HTTP request straight to a vLLM server (one started here
from ``prefloop dev vllm``'s venv unless ``--vllm-url`` names one) and "gateway" is the same
request through a ``prefloop serve`` with PREFLOOP_ENGINE=vllm in front of that server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import pct  # noqa: E402
from service.core.config import Settings  # noqa: E402
from service.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from service.engines.local import LocalEngine  # noqa: E402
from service.engines.modelprep import prepare_default_model  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Name a fruit that is yellow.",
    "Say hello in Spanish.",
    "What is two plus two?",
]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def phase(call, concurrency: int, total: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = list(range(total))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            t0 = time.perf_counter()
            await call(PROMPTS[i % len(PROMPTS)])
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


def start_gateway(
    model_dir: Path, tmp: Path, max_queue: int, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PREFLOOP_MODEL": str(model_dir),
        "PREFLOOP_SERVED_MODEL_NAME": "SmolLM2-135M-Instruct",
        "PREFLOOP_DATABASE_URL": f"sqlite:///{tmp / 'bench.db'}",
        "PREFLOOP_PORT": str(port),
        "PREFLOOP_MAX_QUEUE": str(max_queue),
        "PREFLOOP_LOG_LEVEL": "warning",
        "PREFLOOP_ACCESS_LOG": "false",
        "PREFLOOP_REFRESH_ENABLED": "false",
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the gateway did not become ready in 180 s")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=24, help="requests per phase")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of direct/gateway")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--model", default="", help="HF model dir (default: prepared SmolLM2)")
    ap.add_argument("--engine", choices=["local", "vllm"], default="local")
    ap.add_argument("--vllm-url", default="", help="a running vLLM server (else one is started)")
    args = ap.parse_args()

    settings = Settings()
    model_dir = Path(args.model) if args.model else prepare_default_model(settings.models_dir)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    tmp = Path(tempfile.mkdtemp(prefix="prefloop-bench-"))
    engine, vllm = None, None
    if args.engine == "local":
        engine = LocalEngine(str(model_dir), model_name="SmolLM2-135M-Instruct", max_queue=64)
        await engine.start()
        proc, url = start_gateway(model_dir, tmp, max_queue=64)
    else:
        vllm_url = args.vllm_url
        if not vllm_url:
            vllm = start_vllm(model_dir, settings, tmp)
            vllm_url = vllm.url
        env = {"PREFLOOP_ENGINE": "vllm", "PREFLOOP_VLLM_URLS": vllm_url}
        proc, url = start_gateway(model_dir, tmp, max_queue=64, extra_env=env)
        upstream = httpx.AsyncClient(
            base_url=vllm_url, timeout=120, limits=httpx.Limits(max_connections=16)
        )
    client = httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=16))

    async def direct(prompt: str) -> None:
        if engine is None:  # vLLM's own OpenAI API, the same request body
            r = await upstream.post(
                "/v1/chat/completions",
                json={
                    "model": "SmolLM2-135M-Instruct",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                },
            )
            r.raise_for_status()
            return
        stream = await engine.generate(
            GenerationRequest([{"role": "user", "content": prompt}], params)
        )
        async for _ in stream:
            pass

    async def gateway(prompt: str) -> None:
        r = await client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
            },
        )
        r.raise_for_status()

    try:
        for p in PROMPTS:  # warm-up: first calls pay for allocations and caches
            await direct(p)
            await gateway(p)
        print(
            f"engine {args.engine}, model {model_dir.name}, greedy, max_tokens={args.max_tokens}, "
            f"{args.requests} requests per phase, {args.rounds} rounds, "
            f"torch threads={__import__('torch').get_num_threads()}"
        )
        print(f"{'conc':>4} {'side':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7}")
        for concurrency in (1, 8):
            lat: dict[str, list[float]] = {"direct": [], "gateway": []}
            wall: dict[str, float] = {"direct": 0.0, "gateway": 0.0}
            gateway_cpu = 0.0
            for _ in range(args.rounds):
                for side, call in (("direct", direct), ("gateway", gateway)):
                    cpu0 = cpu_seconds(proc.pid)
                    xs, w = await phase(call, concurrency, args.requests)
                    if side == "gateway":
                        gateway_cpu += cpu_seconds(proc.pid) - cpu0
                    lat[side] += xs
                    wall[side] += w
            rps = {s: args.requests * args.rounds / wall[s] for s in wall}
            for side in ("direct", "gateway"):
                print(
                    f"{concurrency:>4} {side:>8} {pct(lat[side], 50) * 1e3:>8.1f} "
                    f"{pct(lat[side], 99) * 1e3:>8.1f} {rps[side]:>7.2f}"
                )
            added50 = (pct(lat["gateway"], 50) - pct(lat["direct"], 50)) * 1e3
            added99 = (pct(lat["gateway"], 99) - pct(lat["direct"], 99)) * 1e3
            print(
                f"  concurrency {concurrency}: added latency p50 {added50:+.1f} ms, "
                f"p99 {added99:+.1f} ms; gateway/direct throughput "
                f"{rps['gateway'] / rps['direct']:.3f}; p50 latency ratio "
                f"{statistics.median(lat['gateway']) / statistics.median(lat['direct']):.3f}"
            )
            if engine is None:  # the gateway process does no model work: all of it is overhead
                per = gateway_cpu / (args.requests * args.rounds) * 1e3
                print(f"  concurrency {concurrency}: gateway CPU {per:.2f} ms per request")
    finally:
        await client.aclose()
        if engine is not None:
            await engine.aclose()
        else:
            await upstream.aclose()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if vllm is not None:
            vllm.stop()


def start_vllm(model_dir: Path, settings: Settings, tmp: Path):
    from service.engines.vllm_dev import ServerSpec, VLLMServer, install_venv

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = ServerSpec(model=str(model_dir), port=port, served_model_name="SmolLM2-135M-Instruct")
    server = VLLMServer(spec, install_venv(settings.vllm_venv_dir), log_path=tmp / "vllm.log")
    server.start()
    print(f"vLLM on {server.url} healthy after {server.wait_healthy(600):.0f} s", flush=True)
    return server


if __name__ == "__main__":
    asyncio.run(main())
