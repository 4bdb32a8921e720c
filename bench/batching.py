"""Continuous vs static batching in the embedded engine, side by side in one run.

    .venv/bin/python bench/batching.py [--requests 48] [--rate 4] [--rounds 2] [--max-batch 16]

Requests arrive as a Poisson stream (``--rate`` per second, the same arrival times and seeds on
both sides), each asking SmolLM2 for a sampled answer of 8-60 tokens, as chat users do. One
engine admits waiting requests into the running batch between decode steps (continuous, the
default); the other lets a batch finish before the next starts (static: what the engine did
before). Phases alternate so machine noise hits both alike. Prints throughput, time to first
token and whole-answer latency, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import pct  # noqa: E402
from service.core.config import Settings  # noqa: E402
from service.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from service.engines.local import LocalEngine  # noqa: E402
from service.engines.modelprep import prepare_default_model  # noqa: E402

SUBJECTS = ["the moon", "bread", "rivers", "bicycles", "owls", "tea", "volcanoes", "chess"]


def workload(n: int, rate: float, seed: int) -> list[tuple[float, GenerationRequest]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        prompt = f"Tell me something about {SUBJECTS[i % len(SUBJECTS)]}."
        params = SamplingParams(max_tokens=rng.randint(8, 60), temperature=0.7, seed=i)
        out.append((t, GenerationRequest([{"role": "user", "content": prompt}], params)))
    return out


async def phase(engine: LocalEngine, work: list[tuple[float, GenerationRequest]]) -> dict:
    start = time.perf_counter()
    firsts: list[float] = []
    totals: list[float] = []
    tokens = [0]

    async def one(at: float, request: GenerationRequest) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        t0 = time.perf_counter()
        first = None
        async for d in await engine.generate(request):
            if first is None:
                first = time.perf_counter() - t0
            if d.finish_reason:
                tokens[0] += d.completion_tokens
        firsts.append(first or 0.0)
        totals.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(at, r) for at, r in work))
    wall = time.perf_counter() - start
    return {"wall": wall, "tok_s": tokens[0] / wall, "ttft": firsts, "latency": totals}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rate", type=float, default=4.0, help="arrivals per second")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=Settings().max_batch)
    args = p.parse_args()
    model = str(prepare_default_model(Settings().models_dir))
    engines = {
        name: LocalEngine(
            model,
            model_name="smol",
            max_batch=args.max_batch,
            max_queue=args.requests,
            continuous=name == "continuous",
        )  # fmt: skip
        for name in ("continuous", "static")
    }
    for e in engines.values():
        await e.start()
    results: dict[str, list[dict]] = {name: [] for name in engines}
    try:
        for r in range(args.rounds):
            work = workload(args.requests, args.rate, seed=r)
            for name, engine in engines.items():
                res = await phase(engine, work)
                results[name].append(res)
                print(f"round {r + 1} {name:10s}: {res['wall']:.1f} s, {res['tok_s']:.1f} tok/s, "
                      f"TTFT p50 {pct(res['ttft'], 50):.2f} s, latency p50 "
                      f"{pct(res['latency'], 50):.2f} s", flush=True)  # fmt: skip
    finally:
        for e in engines.values():
            await e.aclose()

    def pooled(name: str, key: str) -> list[float]:
        return [x for res in results[name] for x in res[key]]

    tok = {n: statistics.mean(r["tok_s"] for r in results[n]) for n in engines}
    print(f"\n{args.requests} requests x {args.rounds} rounds at {args.rate}/s, max_batch "
          f"{args.max_batch}")  # fmt: skip
    print(f"{'':12s}{'tok/s':>8s}{'TTFT p50':>10s}{'TTFT p95':>10s}{'lat p50':>9s}{'lat p95':>9s}")
    for n in engines:
        t, lat = pooled(n, "ttft"), pooled(n, "latency")
        print(f"{n:12s}{tok[n]:8.1f}{pct(t, 50):10.2f}{pct(t, 95):10.2f}"
              f"{pct(lat, 50):9.2f}{pct(lat, 95):9.2f}")  # fmt: skip
    c, s = "continuous", "static"
    print(f"throughput ratio continuous/static: {tok[c] / tok[s]:.2f}")
    for key in ("ttft", "latency"):
        for q in (50, 95):
            ratio = pct(pooled(c, key), q) / pct(pooled(s, key), q)
            print(f"{key} p{q} ratio continuous/static: {ratio:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
