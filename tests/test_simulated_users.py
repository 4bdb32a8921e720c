"""The loop the service exists for, on the real SmolLM2 (CPU): simulated users with a hidden
preference chat, regenerate, pick and rate the model's own answers through the HTTP API (and an
operator writes ideal answers), a refresh trains and promotes an adapter, and held-out
behaviour moves the users' way while the golden set holds.

Two preferences, each in its own segment (each trains only on its own feedback): users who
prefer concise answers (two refreshes: the second, on fresh feedback, must not regress), and
operators who add the sign-off "— Acme Support" the base model never writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.simulate import (
    CONCISE,
    GOLDEN,
    SIGNOFF,
    Client,
    Measure,
    golden_items,
    measure,
    prompts,
    run_rounds,
)
from tests.servers import serve_subprocess

# Batch 8, as studied (the refresh default is 4: twice the steps, a stronger update).
SIGNOFF_TRAIN = {
    "lr": 3e-4, "beta": 0.5, "rpo_alpha": 4.0, "rpo_span": "diverged", "anchor": 5.0,
    "epochs": 3, "batch_size": 8,
}  # fmt: skip

# Each test chats, trains and evaluates on SmolLM2 on the CPU: minutes, not seconds.
pytestmark = [pytest.mark.slow, pytest.mark.simulation, pytest.mark.timeout(2700)]


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("simulated")
    (home / "golden.jsonl").write_text("".join(json.dumps(g) + "\n" for g in GOLDEN))
    env = {
        "PREFLOOP_HOME": str(home),
        "PREFLOOP_MODEL": str(smollm2_dir),
        "PREFLOOP_SEGMENTS": '["default", "concise", "signoff"]',
        "PREFLOOP_REFRESH_ENABLED": "false",
        "PREFLOOP_WATCH_INTERVAL_SECONDS": "0",
        "PREFLOOP_REFRESH_MIN_PAIRS": "8",
        # 16 users at a time, two answers each when they pick: on 2 CPU cores SmolLM2 decodes
        # 32 rows at 163 tok/s, 8 at 71.
        "PREFLOOP_MAX_BATCH": "32",
        # DPO alone makes the model stop less often after its answer but does not teach it
        # what to write instead (bench/study_signoff.py); the NLL term (rpo_alpha) does. On the
        # whole chosen answer it also sharpens the model's own sampled text, which cost golden
        # items (0.93); on the edit's added tokens only (rpo_span "diverged") it teaches the
        # line. Concise users need only the default (lr 2e-4, study_concise.py).
        "PREFLOOP_REFRESH_TRAIN_SEGMENTS": json.dumps({"signoff": SIGNOFF_TRAIN}),
        # A sign-off is ~7 tokens the base would never write (5-12 nats each): on ~40-token
        # answers that alone is ~1.2 nats/token of KL, over the fleet-wide 1.0. The golden set
        # and the canary length and repetition rules still hold it.
        "PREFLOOP_GATE_SEGMENTS": json.dumps({"signoff": {"max_kl": 2.0}}),
    }
    with serve_subprocess(env, home) as s:
        yield s


@pytest.fixture(scope="module")
def base_measure(server) -> Measure:
    """The base model's greedy held-out and golden answers, measured once for both segments
    (neither has an adapter yet)."""
    _, held = prompts(0)
    result = measure(Client(server.base_url), CONCISE, held, golden_items())
    assert result.versions == {None}
    return result


def test_concise_users_get_shorter_answers_and_a_second_refresh_holds(
    server, base_measure: Measure
) -> None:
    client = Client(server.base_url, model="concise")
    first, second = run_rounds(
        client, CONCISE, "concise", rounds=2, prompts_per_round=90, max_edits=0,
        before=base_measure,
    )  # fmt: skip
    assert first["events"].feedback <= 200
    assert (first["run"]["status"], first["run"]["outcome"]) == ("succeeded", "promoted"), first[
        "run"
    ]
    before, after = first["before"], first["after"]
    assert before.versions == {None} and after.versions == {"concise@v1"}
    assert after.value <= 0.7 * before.value, (before.value, after.value)
    assert after.golden_pass_rate >= before.golden_pass_rate - 0.02

    # A second refresh on fresh feedback: promoted or rejected by the gate, never a regression.
    assert second["run"]["status"] == "succeeded", second["run"]
    final = second["after"]
    assert final.value <= 0.7 * before.value, (before.value, final.value)
    assert final.golden_pass_rate >= before.golden_pass_rate - 0.02


def test_operator_edits_teach_the_sign_off(server, base_measure: Measure) -> None:
    client = Client(server.base_url, model="signoff")
    [result] = run_rounds(
        client, SIGNOFF, "signoff", rounds=1, prompts_per_round=80, max_edits=50,
        before=base_measure,
    )  # fmt: skip
    assert result["events"].edits <= 50
    assert result["events"].feedback <= 200
    run = result["run"]
    assert (run["status"], run["outcome"]) == ("succeeded", "promoted"), run
    before, after = result["before"], result["after"]
    assert before.versions == {None} and after.versions == {"signoff@v1"}
    assert before.value == 0.0  # the base model never signs off
    assert after.value >= 0.5, after.answers
    assert after.golden_pass_rate >= before.golden_pass_rate - 0.02
