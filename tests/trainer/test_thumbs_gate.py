"""CI's learning gate for lone thumbs, on the real SmolLM2: visitors who each asked once and rated
the one answer they got (tests/data/thumbs/, made by `bench/thumbs.py make-data`) must, through
the refresh's own compiler, matching, recipe and gate, make held-out greedy answers shorter
without losing the golden set.

Deterministic: the committed events, the seed and greedy decoding fix every number (CPU
kernels). The margins come from `bench/thumbs.py study` (docs/learning.md): on all 300 events
the effect is far above its shuffled-label control over 3 seeds.
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
EVENTS = 150  # the first half of the committed events: half the training time
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_refresh_on_lone_thumbs_learns_what_visitors_liked(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    # In a process of its own, as a refresh's trainer is (see test_learning_gate.py).
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PREFLOOP_HOME"] = str(TEST_HOME)  # where smollm2_dir was prepared
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "bench" / "thumbs.py"), "run", "--seed", "0",
           "--events", str(EVENTS), "--no-progress", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    c = r["counts"]
    assert c["pairs"] == 0 and c["matched"] > 0 and c["thumbs_up"] and c["thumbs_down"], c
    assert r["approved"], r["reasons"]
    # The behaviour visitors rewarded, on prompts about subjects none of them asked about
    # (measured 0.52 on these 150 events; the shuffled control of all 300 moved it to 0.98).
    assert r["length_ratio"] <= 0.9, r
    # Nothing the base model answered correctly is lost beyond the gate's tolerance.
    assert r["golden_loss"] <= 0.02, r
