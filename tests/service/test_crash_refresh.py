"""SIGKILL of the server at every step of a refresh, with real processes on a tiny model and a
real SQLite file: after each kill no training or evaluation process is left running (they die
with the server), and after the restart the run is marked failed, every feedback row, compiled
pair and registered version is still there (with its files), the active adapter is the one
before the kill, and a new refresh runs to the end."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.test_durability import start_server
from tests.service.test_refresh import FAST, OPS

# Starts and kills the server nine times; trains the tiny model.
pytestmark = pytest.mark.slow

# Killed as the step starts (PREFLOOP_FAILPOINT), or while its subprocess runs.
STEPS = ["compile", "select", "train", "register", "evaluate", "gate", "promote"]
MID = ["train", "evaluate"]


def env_for(home: Path, model: Path) -> dict[str, str]:
    env = {
        "PREFLOOP_HOME": str(home),
        "PREFLOOP_MODEL": str(model),
        "PREFLOOP_ACCESS_LOG": "false",
    }
    for key, value in FAST.items():
        text = json.dumps(value) if isinstance(value, dict) else str(value).lower()
        env[f"PREFLOOP_{key.upper()}"] = text if isinstance(value, bool | dict) else str(value)
    return env


def trainer_processes(home: Path, step: str | None = None) -> list[int]:
    """Live `python -m trainer [step] ...` processes working in this test's home."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        ours = b"trainer" in cmd and any(str(home).encode() in c for c in cmd) and state != "Z"
        if ours and (step is None or step.encode() in cmd):
            found.append(int(pid))
    return found


def snapshot(db: Path) -> dict[str, Any]:
    with sqlite3.connect(db) as conn:
        q = lambda sql: conn.execute(sql).fetchall()  # noqa: E731
        return {
            "feedback": set(q("SELECT id, value FROM feedback")),
            "pairs": {r[0] for r in q("SELECT id FROM preferencepair")},
            "versions": set(q("SELECT id, path FROM adapterversion")),
            "active": q("SELECT id FROM adapterversion WHERE status = 'active'"),
        }


def add_votes(base_url: str, round_: int) -> None:
    """Eight A/B picks on fresh answers: eight new preference pairs."""
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for i in range(8):
            r = http.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": f"Round {round_}, question {i}?"}],
                    "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 100 * round_ + i,
                },
            )  # fmt: skip
            assert r.status_code == 200, r.text
            r = http.post(
                "/v1/feedback",
                json={"completion_id": r.json()["id"], "type": "pick", "chosen_index": i % 2,
                      "user": f"r{round_}u{i}"},
            )  # fmt: skip
            assert r.status_code == 201, r.text


def wait_for(condition, timeout: float, what: str) -> Any:  # noqa: ANN001 - a callable
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_at_every_refresh_step_loses_nothing_and_leaves_nothing_running(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    env = env_for(tmp_path, tiny_llama_dir)
    db = tmp_path / "prefloop.db"
    log = tmp_path / "server.log"
    cases = [(step, "start") for step in STEPS] + [(step, "mid") for step in MID]

    def armed(case: int) -> dict[str, str]:
        """The server for ``cases[case]``: its failpoint armed when it kills a step as it starts
        (a restart that recovers from one kill arms the next, so each kill costs one start)."""
        if case < len(cases) and cases[case][1] == "start":
            return {**env, "PREFLOOP_FAILPOINT": f"refresh:{cases[case][0]}"}
        return env

    proc, base_url = start_server(armed(0), log)
    add_votes(base_url, 0)
    killed: list[tuple[str, str, str]] = []  # (run id, step, when)
    try:
        for round_, (step, when) in enumerate(cases, start=1):
            add_votes(base_url, round_)
            before = snapshot(db)
            run_id = httpx.post(f"{base_url}/v1/operator/runs", headers=OPS).json()["id"]
            if when == "mid":
                wait_for(lambda s=step: trainer_processes(tmp_path, s), 180, f"{step} to run")
                proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=180) == -signal.SIGKILL, log.read_text()[-3000:]
            killed.append((run_id, step, when))
            # Nothing is left running: the trainer died with the server.
            wait_for(lambda: not trainer_processes(tmp_path), 15, "the trainer to exit")

            proc, base_url = start_server(armed(round_), log)
            after = snapshot(db)
            assert after["feedback"] == before["feedback"]
            assert after["pairs"] >= before["pairs"]
            assert after["versions"] >= before["versions"]
            assert after["active"] == before["active"]
            for _vid, path in after["versions"]:
                assert (Path(path) / "adapter_model.safetensors").is_file(), path
            run = httpx.get(f"{base_url}/v1/operator/runs/{run_id}", headers=OPS).json()
            assert run["status"] == "failed" and run["stage"] == step, run
            assert run["error"].startswith(f"interrupted at {step}"), run["error"]

        # After all that, a refresh runs to its end and its adapter serves.
        add_votes(base_url, len(cases) + 1)
        run_id = httpx.post(f"{base_url}/v1/operator/runs", headers=OPS).json()["id"]
        run = wait_for(
            lambda: (
                (r := httpx.get(f"{base_url}/v1/operator/runs/{run_id}", headers=OPS).json())[
                    "status"
                ]
                not in ("queued", "running")
                and r
            ),
            timeout=300,
            what="the last refresh",
        )
        assert (run["status"], run["outcome"]) == ("succeeded", "promoted"), run

        def served() -> bool:  # the swap follows the promotion within a moment
            r = httpx.post(
                f"{base_url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                timeout=60,
            )
            return r.json()["adapter_version"] == run["candidate_version"]

        wait_for(served, 30, f"{run['candidate_version']} to serve")
    finally:
        proc.kill()
        proc.wait()
    print(f"\ncrash test: killed at {[(s, w) for _, s, w in killed]}; all recovered")
