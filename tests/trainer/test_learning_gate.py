"""CI's learning gate, on the real SmolLM2: a refresh on fixed, committed on-policy preference
data (the concise users' judgements of the model's own answers, tests/data/learning/, made by
`bench/learning_gate.py make-data`) with a fixed trainer seed must make held-out greedy answers
shorter, pass the regression gate, rank held-out pairs the users' way and keep the golden set.

Deterministic: the data, the seed and greedy decoding fix every number (CPU kernels). The margins
come from `bench/learning_gate.py study` (docs/learning.md): over 5 trainer seeds the effect is
several times its spread, and a shuffled-label control neither moves the answers nor passes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_HOME

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_refresh_on_committed_preferences_learns_them_without_forgetting(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    # The bench command, in a process of its own as a refresh's trainer is: torch there owns
    # both cores with its default thread waits (this process sets passive ones for servers).
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PREFLOOP_HOME"] = str(TEST_HOME)  # where smollm2_dir was prepared
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "bench" / "learning_gate.py"), "run", "--seed", "0",
           "--no-progress", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["approved"], r["reasons"]
    # The behaviour users asked for, on prompts about subjects no training pair mentions.
    assert r["length_ratio"] <= 0.95, r
    assert r["pair_accuracy"] >= 0.55, r
    # Nothing the base model answered correctly is lost beyond the gate's tolerance.
    assert r["golden_loss"] <= 0.02, r
