"""Hot-swap under steady load: how long from a promotion until users are served by the new
version, how many requests fail during swaps, and what swapping costs the requests around it.

    .venv/bin/python bench/hotswap.py [--swaps 10] [--clients 4] [--max-tokens 16]

A `prefloop serve` replica runs the real SmolLM2 on the CPU in its own process; this process
is "another process" too. Under a steady load of greedy chat requests it makes ``--swaps``
promotions and rollbacks, half through the replica's operator API (the replica syncs at once)
and half straight in the database, as the CLI or another replica would (the replica notices on
its next poll). Per swap it measures:

- routed: promotion committed -> the replica routes new requests to the new version (loading
  the adapter, then the flip), read from its operator API every 10 ms;
- answered: promotion committed -> the first complete answer by the new version to a request
  sent after the promotion (adds the wait for a client's next request and its generation).

Then it compares request latency in a calm phase (same load, no swaps) with the swap phase,
side by side. Targets: routed <= 1 s, 0 failed requests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.registry import APPROVED, Registry  # noqa: E402
from bench import pct  # noqa: E402
from service.core.config import Settings  # noqa: E402
from service.engines.modelprep import prepare_default_model  # noqa: E402
from service.storage.db import init_db, make_engine  # noqa: E402
from tests.servers import serve_subprocess  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name a yellow fruit.", "Say hello in Spanish."]


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA (r16 on every projection, as the trainer makes) with random non-zero weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        init_lora_weights=False,
    )
    get_peft_model(model, cfg).save_pretrained(out)
    return out


class Load:
    """``clients`` threads sending greedy requests back to back; every outcome recorded."""

    def __init__(self, base_url: str, clients: int, max_tokens: int):
        self.base_url, self.clients, self.max_tokens = base_url, clients, max_tokens
        self.records: list[tuple[float, float, str | None]] = []  # (start, end, version)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _client(self, k: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120) as http:
            i = k
            while not self._stop.is_set():
                i += 1
                body = {
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": self.max_tokens,
                    "temperature": 0,
                }
                t0 = time.monotonic()
                try:
                    r = http.post("/v1/chat/completions", json=body)
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    version = r.json()["adapter_version"]
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                self.records.append((t0, time.monotonic(), version))

    def start(self) -> None:
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._client, args=(k,)) for k in range(self.clients)
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--swaps", type=int, default=10)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--calm-seconds", type=float, default=20.0)
    p.add_argument("--gap-seconds", type=float, default=2.0, help="load between swaps")
    args = p.parse_args()

    base = prepare_default_model(Settings().models_dir)
    tmp = Path(tempfile.mkdtemp(prefix="prefloop-hotswap-"))
    db_url = f"sqlite:///{tmp / 'prefloop.db'}"
    db = make_engine(Settings(database_url=db_url))
    init_db(db)
    registry = Registry(db, tmp / "adapters")
    ids = []
    for i in range(3):
        row = registry.register(make_adapter(base, tmp / "src" / f"a{i}", seed=i), actor="bench")
        registry.transition(row.id, APPROVED, actor="bench")
        ids.append(row.id)

    env = {
        "PREFLOOP_HOME": str(tmp),
        "PREFLOOP_DATABASE_URL": db_url,
        "PREFLOOP_MODEL": str(base),
        "PREFLOOP_WATCH_INTERVAL_SECONDS": "0",
        "PREFLOOP_LOG_LEVEL": "warning",
    }
    threads = os.cpu_count() or 1
    print(f"SmolLM2-135M on CPU ({threads} cores), {args.clients} clients, "
          f"max_tokens {args.max_tokens}, {args.swaps} swaps")  # fmt: skip
    with serve_subprocess(env, tmp) as server:
        ops = httpx.Client(base_url=server.base_url, timeout=120, headers={"X-Operator": "bench"})
        registry.promote(ids[0], actor="bench")  # start from an adapter, as in production
        time.sleep(1.0)

        load = Load(server.base_url, args.clients, args.max_tokens)
        load.start()
        time.sleep(args.calm_seconds)
        calm = [e - s for s, e, _ in load.records]
        n_calm = len(load.records)

        swaps: list[tuple[str, float, float | None, float | None]] = []
        for k in range(args.swaps):
            current = registry.active()["default"].id
            target = ids[(ids.index(current) + 1) % len(ids)]
            via = "api" if k % 2 == 0 else "db"
            if via == "api":
                ops.post(f"/v1/operator/adapters/{target}/promote").raise_for_status()
            else:
                registry.promote(target, actor="bench-other-process")
            committed = time.monotonic()
            routed = None
            while time.monotonic() - committed < 30:  # the replica's route, every 10 ms
                serving = ops.get("/v1/operator/adapters?limit=1").json()["serving"]
                if serving.get("default") == target:
                    routed = time.monotonic() - committed
                    break
                time.sleep(0.01)
            answered = None
            while time.monotonic() - committed < 60:
                ends = [e for s, e, v in list(load.records) if v == target and s >= committed]
                if ends:
                    answered = min(ends) - committed
                    break
                time.sleep(0.05)
            time.sleep(args.gap_seconds)
            swaps.append((via, committed, routed, answered))
        load.stop()
        swap_lat = [e - s for s, e, _ in load.records[n_calm:]]
        log_tail = server.log()[-2000:]

    print(f"\n{'swap':>4} {'via':>4} {'routed s':>9} {'answered s':>11}")
    for k, (via, _t, routed, answered) in enumerate(swaps, 1):
        r = f"{routed:.3f}" if routed is not None else "never"
        a = f"{answered:.3f}" if answered is not None else "never"
        print(f"{k:>4} {via:>4} {r:>9} {a:>11}")
    for via in ("api", "db"):
        rs = [r for v, _, r, _ in swaps if v == via and r is not None]
        if rs:
            print(f"routed via {via}: median {statistics.median(rs):.3f} s, max {max(rs):.3f} s")
    routed_all = [r for _, _, r, _ in swaps if r is not None]
    print(f"\nrequests: {n_calm} calm, {len(swap_lat)} during swaps, "
          f"failed: {len(load.failures)}")  # fmt: skip
    for q in (50, 95):
        c, w = pct(calm, q), pct(swap_lat, q)
        print(f"latency p{q}: calm {c:.3f} s, during swaps {w:.3f} s, ratio {w / c:.2f}")
    ok_routed = len(routed_all) == len(swaps) and max(routed_all) <= 1.0
    print(f"target routed <= 1 s: {'met' if ok_routed else 'NOT met'} "
          f"(max {max(routed_all) if routed_all else float('nan'):.3f} s); "
          f"target 0 failed: {'met' if not load.failures else 'NOT met'}")  # fmt: skip
    for f in load.failures[:5]:
        print("  failure:", f)
    if load.failures:
        print(log_tail)
    db.dispose()
    return 0 if ok_routed and not load.failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
