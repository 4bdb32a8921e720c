"""CI's learning gate, on the real SmolLM2: a refresh on fixed, committed on-policy preference
data (the concise users' judgements of the model's own answers, tests/data/learning/, made by
`bench/learning_gate.py make-data`) with a fixed trainer seed must make held-out greedy answers
shorter, pass the regression gate, rank held-out pairs the users' way and keep the golden set.

Deterministic: the data, the seed and greedy decoding fix every number (CPU kernels). The margins
come from `bench/learning_gate.py study` (docs/learning.md): over 5 trainer seeds the effect is
several times its spread, and a shuffled-label control neither moves the answers nor passes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.learning_gate import run_gate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_refresh_on_committed_preferences_learns_them_without_forgetting(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    r = run_gate(smollm2_dir, tmp_path, seed=0)
    assert r["approved"], r["reasons"]
    # The behaviour users asked for, on prompts about subjects no training pair mentions.
    assert r["length_ratio"] <= 0.95, r
    assert r["pair_accuracy"] >= 0.55, r
    # Nothing the base model answered correctly is lost beyond the gate's tolerance.
    assert r["golden_loss"] <= 0.02, r
