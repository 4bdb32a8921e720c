"""A live canary end to end on the real SmolLM2 (issue 23): `prefloop serve` in a subprocess
with PREFLOOP_CANARY_SHARE=0.5. Feedback given through the HTTP API feeds a refresh
(POST /v1/operator/runs) that trains, evaluates and gates a candidate and starts a canary
instead of promoting it; simulated end users chat (each answer from the arm the sticky split
gives its user) and rate with a hidden preference; the decision loop in the server promotes
the candidate they like. A second refresh, warm-started from it, makes a candidate they dislike:
the loop rejects it, and its incumbent never stops serving.

The training is a few steps on a few pairs and the gate lenient: the point is the loop and its
plumbing on the real model, not what the adapters learn (tests/trainer/test_learning_gate.py
checks that).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.canary import assign
from tests.servers import serve_subprocess
from tests.service.conftest import Live
from tests.service.test_refresh import LENIENT_GATE, wait_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

OPS = {"X-Operator": "olga"}
QUESTIONS = [
    "What is a good name for a cat?",
    "How do I boil an egg?",
    "Suggest a weekend hobby.",
    "Why is the sea salty?",
    "What should I pack for a picnic?",
    "How can I sleep better?",
    "Name a fun board game.",
    "What is a healthy breakfast?",
    "How do plants drink water?",
    "Give me a tip for learning guitar.",
    "What makes a good password?",
    "How do I keep basil alive?",
]
# Ten outcomes per arm before any decision; tau 0.3 tunes the test for big differences, so the
# users' 80/20 preference below decides in about 15 to 25 outcomes per arm (adapters/canary.py).
POLICY = {"min_outcomes": 10, "tau": 0.3}
# A few optimizer steps on short sequences: enough to make a real adapter version.
TRAIN = {"lr": 5e-4, "epochs": 1, "batch_size": 8, "micro_batch_size": 4, "max_length": 48,
         "eval_fraction": 0.0}  # fmt: skip
# The tiny-model tests' lenient gate, and lone thumbs' AUC check skipped too: a few steps on a
# few dozen thumbs rank the held-out ones by chance.
GATE = {**LENIENT_GATE, "min_thumbs": 1000}
# The gate's drift prompts (the operator's file replaces the shipped 16): fewer, for time.
DRIFT_PROMPTS = ["What is the capital of Japan?", "Write a haiku about rain.", "Say hello."]
MAX_VOTERS = 150


def env_for(model_dir: Path, home: Path) -> dict[str, str]:
    return {
        "PREFLOOP_HOME": str(home),
        "PREFLOOP_MODEL": str(model_dir),
        "PREFLOOP_REFRESH_ENABLED": "false",  # refreshes only when the test asks
        "PREFLOOP_CANARY_SHARE": "0.5",
        "PREFLOOP_CANARY": json.dumps(POLICY),
        "PREFLOOP_WATCH_INTERVAL_SECONDS": "1",
        "PREFLOOP_REFRESH_MIN_PAIRS": "2",
        "PREFLOOP_REFRESH_HELDOUT_FRACTION": "0.25",
        "PREFLOOP_REFRESH_TRAIN": json.dumps(TRAIN),
        "PREFLOOP_EVAL_MAX_NEW_TOKENS": "8",
        "PREFLOOP_GOLDEN_INCLUDE_SHIPPED": "false",  # 113 items x 3 models: minutes on 2 cores
        "PREFLOOP_GATE": json.dumps(GATE),
    }


def picks(live: Live, questions: list[str], users: int = 4) -> None:
    """A/B picks on fresh n=2 answers from a few users: one preference pair each."""
    for i, question in enumerate(questions):
        user = f"picker-{i % users}"
        answer = live.chat([{"role": "user", "content": question}], n=2, user=user)
        r = live.feedback(completion_id=answer["id"], type="pick", chosen_index=i % 2, user=user)
        assert r.status_code == 201, r.text


def refresh_into_canary(live: Live) -> tuple[dict[str, Any], dict[str, Any]]:
    """POST /v1/operator/runs, wait; the approved candidate is canaried: (the run, the running
    experiment)."""
    r = live.http.post("/v1/operator/runs", json={"segment": "default"}, headers=OPS)
    assert r.status_code == 202, r.text
    run = wait_run(live, r.json()["id"], timeout=300)
    assert (run["status"], run["outcome"]) == ("succeeded", "canary"), (run["error"], run["log"])
    assert [s["name"] for s in run["steps"]][-2:] == ["gate", "canary"]
    listed = live.http.get("/v1/operator/experiments?status=running", headers=OPS).json()["data"]
    assert len(listed) == 1 and listed[0]["candidate"] == run["candidate_version"], listed
    exp = listed[0]
    assert exp["id"] == run["steps"][-1]["detail"]["experiment"]
    assert exp["share"] == 0.5 and exp["policy"]["min_outcomes"] == 10
    assert adapter(live, exp["candidate"])["status"] == "approved"  # the canary decides
    # The split starts once this replica has loaded the candidate (until then everyone gets
    # the incumbent, each answer counted for the version that gave it).
    probe = next(f"probe-{i}" for i in range(100) if assign(exp["id"], f"probe-{i}", 0.5))
    wait_until(lambda: served(live, probe) == exp["candidate"])
    print("refresh", run["counts"], {s["name"]: s.get("seconds") for s in run["steps"]})
    return run, exp


def adapter(live: Live, version: str) -> dict[str, Any]:
    return live.http.get(f"/v1/operator/adapters/{version}", headers=OPS).json()


def status(live: Live, exp_id: str) -> str:
    return live.http.get(f"/v1/operator/experiments/{exp_id}", headers=OPS).json()["status"]


def served(live: Live, user: str) -> str | None:
    return live.chat([{"role": "user", "content": "Hi!"}], user=user, max_tokens=2)[
        "adapter_version"
    ]


def wait_until(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def users_vote(live: Live, exp: dict[str, Any], prefix: str, likes_candidate: bool) -> int:
    """New end users chat, one question each, until the experiment ends; each answer comes from
    the arm the sticky split gives its user. Their hidden taste: most like the favoured arm's
    answers and dislike the other's, every fifth rater the reverse, every sixth user never
    rates. Returns how many users chatted."""
    for i in range(MAX_VOTERS):
        if status(live, exp["id"]) != "running":
            return i
        user = f"{prefix}-{i}"
        answer = live.chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], user=user)
        on_candidate = assign(exp["id"], user, exp["share"])
        arm = exp["candidate"] if on_candidate else exp["incumbent"]
        # Once the loop has decided, the router may already serve everyone the winner.
        assert answer["adapter_version"] == arm or status(live, exp["id"]) != "running", answer
        if i % 6 == 5:
            continue  # silent: not counted
        liked = (answer["adapter_version"] == exp["candidate"]) == likes_candidate
        contrarian = i % 6 == 0
        r = live.feedback(completion_id=answer["id"], rating=1 if liked != contrarian else -1)
        assert r.status_code == 201, r.text
    raise AssertionError(f"no decision after {MAX_VOTERS} users: {status(live, exp['id'])}")


def ended(live: Live, exp: dict[str, Any]) -> dict[str, Any]:
    wait_until(lambda: status(live, exp["id"]) != "running")
    detail = live.http.get(f"/v1/operator/experiments/{exp['id']}", headers=OPS).json()
    arms = {a["arm"]: a for a in detail["arms"]}
    print(detail["status"], detail["reason"], arms, sep="\n  ")  # -rP shows it
    assert detail["ended_by"] == "canary"
    assert min(detail["snapshot"]["outcomes"]) >= 10
    return detail


def test_a_refresh_is_canaried_then_promoted_and_the_next_one_rolled_back(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    drift = "".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n"
                    for p in DRIFT_PROMPTS)  # fmt: skip
    (tmp_path / "canary.jsonl").write_text(drift)
    with (
        serve_subprocess(env_for(smollm2_dir, tmp_path), tmp_path) as server,
        httpx.Client(base_url=server.base_url, timeout=120) as http,
    ):
        live = Live(base_url=server.base_url, db_url=server.db_url, http=http)

        # 1. Users' picks train a candidate; the gate approves it; it goes to half the users.
        picks(live, QUESTIONS)
        run, exp = refresh_into_canary(live)
        v1 = exp["candidate"]
        assert run["counts"]["pairs"] >= 2 and run["counts"]["thumbs_up"] == 0  # the picks
        assert (v1, exp["incumbent"]) == ("default@v1", None)  # against the base model
        users = users_vote(live, exp, "early", likes_candidate=True)
        detail = ended(live, exp)
        assert detail["status"] == "promoted", detail["reason"]
        assert detail["snapshot"]["interval"][0] > 0  # proven better
        assert adapter(live, v1)["status"] == "active"
        voters = [f"early-{i}" for i in range(users)]
        on_v1 = [u for u in voters if assign(exp["id"], u, 0.5)]
        everyone = on_v1[:3] + [u for u in voters if u not in on_v1][:3]  # from both arms
        wait_until(lambda: [served(live, u) for u in everyone] == [v1] * 6)
        models = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert v1 in models

        # 2. The next refresh trains on the first canary's thumbs, warm-started from v1: a
        # candidate the users dislike. Rolled back; v1 serves throughout.
        run, exp = refresh_into_canary(live)
        assert run["counts"]["thumbs_up"] and run["counts"]["thumbs_down"], run["counts"]
        v2 = exp["candidate"]
        assert (v2, exp["incumbent"]) == ("default@v2", v1)
        assert adapter(live, v2)["parent"] == v1
        users_vote(live, exp, "late", likes_candidate=False)
        detail = ended(live, exp)
        assert detail["status"] == "rolled_back", detail["reason"]
        assert detail["snapshot"]["interval"][1] < 0  # proven worse
        assert adapter(live, v2)["status"] == "rejected"
        assert adapter(live, v1)["status"] == "active"
        wait_until(lambda: v2 not in [m["id"] for m in http.get("/v1/models").json()["data"]])
        assert [served(live, f"late-{i}") for i in range(6)] == [v1] * 6
