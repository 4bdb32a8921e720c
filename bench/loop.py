"""Freshness: from the last feedback event to the first request served by the adapter that
learned from it, split into compile / train / evaluate+gate / swap.

    .venv/bin/python bench/loop.py [--prompts 60]

A `prefloop serve` replica on SmolLM2 (CPU) gets simulated users' feedback (`bench/simulate.py`,
the concise preference), then one refresh is started the moment the last event is committed,
and a probe asks the replica every 50 ms which version serves the segment. Prints each part's
seconds and its share of the total.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.simulate import CONCISE, GOLDEN, Client, prompts, simulate_users  # noqa: E402


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=60)
    args = p.parse_args()

    from service.core.config import Settings
    from service.engines.modelprep import prepare_default_model
    from tests.servers import serve_subprocess

    home = Path(tempfile.mkdtemp(prefix="prefloop-loop-"))
    (home / "golden.jsonl").write_text("".join(json.dumps(g) + "\n" for g in GOLDEN))
    env = {
        "PREFLOOP_HOME": str(home),
        "PREFLOOP_MODEL": str(prepare_default_model(Settings().models_dir)),
        "PREFLOOP_SEGMENTS": '["default", "concise"]',
        "PREFLOOP_REFRESH_ENABLED": "false",
        "PREFLOOP_WATCH_INTERVAL_SECONDS": "0",
        "PREFLOOP_REFRESH_MIN_PAIRS": "8",
        "PREFLOOP_LOG_LEVEL": "warning",
    }
    with serve_subprocess(env, home) as server:
        client = Client(server.base_url, model="concise")
        train, _ = prompts(0)
        events = simulate_users(client, CONCISE, train[: args.prompts])
        last_feedback = time.monotonic()
        print(f"{events.feedback} feedback events from {events.chats} chats")
        r = client.http.post(
            "/v1/operator/runs", json={"segment": "concise"}, headers={"X-Operator": "bench"}
        )
        r.raise_for_status()
        run_id = r.json()["id"]
        served_at = None
        while True:
            run = client.http.get(f"/v1/operator/runs/{run_id}", headers={"X-Operator": "b"}).json()
            if run["status"] not in ("queued", "running") and run["outcome"] != "promoted":
                print(f"the refresh did not promote: {run['status']} {run['outcome']} "
                      f"{run['error']} {run.get('verdict')}")  # fmt: skip
                return 1
            if run["outcome"] == "promoted" or run["stage"] == "promote":
                serving = client.http.get(
                    "/v1/operator/adapters?limit=1", headers={"X-Operator": "b"}
                ).json()["serving"]
                if serving.get("concise") == run["candidate_version"]:
                    # the next request is the first one served by the new version
                    _, version = client.greedy("Hello!")
                    served_at = time.monotonic()
                    assert version == run["candidate_version"], version
                    break
            time.sleep(0.05)
        run = client.http.get(f"/v1/operator/runs/{run_id}", headers={"X-Operator": "b"}).json()

    steps = {s["name"]: s["seconds"] for s in run["steps"]}
    total = served_at - last_feedback
    parts = {
        "compile": steps.get("compile", 0) + steps.get("select", 0),
        "train (subprocess)": steps.get("train", 0),
        "register + evaluate + gate": sum(
            steps.get(k, 0) for k in ("register", "evaluate", "gate")
        ),
        "promote": steps.get("promote", 0),
    }
    parts["swap + first request"] = max(0.0, total - sum(parts.values()))
    print(f"\nfreshness: {total:.1f} s from the last feedback event to the first request served "
          f"by {run['candidate_version']} ({run['counts']})")  # fmt: skip
    for name, seconds in parts.items():
        print(f"  {name:<28} {seconds:8.1f} s  {seconds / total:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
