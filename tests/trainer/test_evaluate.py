"""Offline evaluation: the report's shape, the base model as its own yardstick (accuracy 0.5,
margin 0, KL 0, length ratio 1), one adapter measured twice alike, the CLI, and (slow) golden
checks judged on real SmolLM2 answers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import write_pairs
from trainer.data import read_rows
from trainer.evaluate import evaluate, load_canary, repetition, sample_prompts, summary_line
from trainer.golden import parse_item, save_golden

GOLDEN = [
    parse_item(
        {"id": "fr", "prompt": "What is the capital of France?", "checks": {"max_chars": 1}}
    ),
    parse_item({"id": "hi", "prompt": "Say hi.", "checks": {"not_contains": ["zzzz"]}}),
]
CANARY = [
    [{"role": "user", "content": "What is 2 plus 2?"}],
    [{"role": "user", "content": "Name a color."}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a fact."},
    ],
]


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA on the tiny Llama with non-zero weights, so it changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    lora = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    out = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, lora).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return read_rows(write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 5))


def _numbers(side: dict) -> dict:
    return {k: v for k, v in side.items() if k != "path"}


def test_report_shape_and_base_yardstick(
    tiny_llama_dir: Path, adapter_dir: Path, pairs: list[dict]
) -> None:
    calls: list[tuple[str, int, int]] = []
    # Lone thumbs: each pair's answers as an up and a down, rated on their own.
    thumbs = [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in pairs
        for side in ("chosen", "rejected")
    ]
    report = evaluate(
        tiny_llama_dir,
        adapter_dir,
        None,
        pairs=pairs,
        unpaired=thumbs,
        golden=GOLDEN,
        canary=None,  # the shipped set
        max_new_tokens=6,
        progress=False,
        on_progress=lambda *a: calls.append(a),
    )
    json.dumps(report, allow_nan=False)  # JSON as it stands
    assert set(report) == {
        "format",
        "created_at",
        "base",
        "candidate",
        "incumbent",
        "base_model",
        "samples",
        "settings",
        "cached",
        "seconds",
    }
    assert report["format"] == "prefloop-eval/1" and report["base"] == str(tiny_llama_dir)
    n_canary = len(load_canary())
    assert n_canary >= 12
    assert report["settings"] == {
        "beta": 0.1,
        "max_new_tokens": 6,
        "n_pairs": 5,
        "n_unpaired": 10,
        "n_golden": 2,
        "n_canary": n_canary,
    }
    cand, inc = report["candidate"], report["incumbent"]
    assert cand["path"] == str(adapter_dir) and inc["path"] is None
    assert report["base_model"] == {"golden": inc["golden"]}  # the incumbent is the base
    assert inc["links"] == {"answers": 0, "links": []}  # the base has no links new to itself
    for side in (cand, inc):
        assert set(side) == {"path", "pairs", "thumbs", "golden", "drift", "links"}
        assert set(side["links"]) == {"answers", "links"}
        assert side["thumbs"].keys() == {"n", "n_up", "n_down", "auc", "gap"}
        assert (side["thumbs"]["n_up"], side["thumbs"]["n_down"]) == (5, 5)
        assert set(side["pairs"]) == {"n", "accuracy", "margin"} and side["pairs"]["n"] == 5
        assert set(side["golden"]) == {"n", "passed", "pass_rate", "failures"}
        assert set(side["drift"]) == {"n", "length_ratio", "repetition", "kl"}
        assert side["drift"]["n"] == n_canary
        golden = side["golden"]
        assert golden["n"] == 2 and golden["passed"] == 2 - len(golden["failures"])
        assert golden["pass_rate"] == golden["passed"] / 2
        for f in golden["failures"]:
            assert set(f) == {"id", "failed", "answer"} and f["failed"]
        assert 0.0 <= side["drift"]["repetition"] <= 1.0

    # The base measured against itself: every reward is exactly 0, so every pair ties.
    assert inc["pairs"]["accuracy"] == 0.5 and inc["pairs"]["margin"] == 0.0
    assert inc["thumbs"]["auc"] == 0.5 and inc["thumbs"]["gap"] == 0.0
    # The thumbs gap is the pairs' margin in another order: the same rewards, averaged.
    assert cand["thumbs"]["gap"] == pytest.approx(cand["pairs"]["margin"], abs=1e-5)
    assert cand["thumbs"]["auc"] != 0.5
    assert inc["drift"]["kl"] == 0.0 and inc["drift"]["length_ratio"] == 1.0
    assert cand["drift"]["kl"] > 0
    assert cand["pairs"]["margin"] != 0.0

    # Side by side: each distinct held-out prompt (the thumbs repeat the pairs' prompts) with
    # the greedy answer of both sides, and what its users preferred and disliked.
    samples = report["samples"]
    assert [s["prompt"] for s in samples] == [p["prompt"] for p in pairs]
    assert [s["preferred"] for s in samples] == [p["chosen"][0]["content"] for p in pairs]
    assert [s["disliked"] for s in samples] == [p["rejected"][0]["content"] for p in pairs]
    for s in samples:
        assert set(s) == {"prompt", "preferred", "disliked", "candidate", "incumbent"}
        assert isinstance(s["candidate"], str) and isinstance(s["incumbent"], str)

    stages = {stage for stage, _, _ in calls}
    assert {"base pairs", "base thumbs", "candidate thumbs", "candidate kl"} <= stages
    # The incumbent is the base: its sample answers are generated once, as the base's.
    assert {"candidate samples", "base samples"} <= stages and "incumbent samples" not in stages
    assert all(0 < done <= total for _, done, total in calls)
    assert ("candidate kl", n_canary, n_canary) in calls


def test_same_adapter_on_both_sides_scores_alike(
    tiny_llama_dir: Path, adapter_dir: Path, pairs: list[dict]
) -> None:
    report = evaluate(
        tiny_llama_dir,
        adapter_dir,
        adapter_dir,
        pairs=pairs,
        golden=GOLDEN,
        canary=CANARY,
        max_new_tokens=6,
        progress=False,
    )
    assert report["candidate"] == report["incumbent"]
    assert report["candidate"]["drift"]["kl"] > 0
    assert len(report["samples"]) == 5
    assert all(s["candidate"] == s["incumbent"] for s in report["samples"])


def test_cached_answers_give_the_same_report_without_generating(
    tiny_llama_dir: Path, adapter_dir: Path, pairs: list[dict], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"

    def run(candidate: Path | None, incumbent: Path | None, **kw) -> tuple[dict, set[str]]:
        calls: list[tuple[str, int, int]] = []
        args = {"pairs": pairs, "golden": GOLDEN, "canary": CANARY, "max_new_tokens": 6}
        report = evaluate(
            tiny_llama_dir,
            candidate,
            incumbent,
            **{**args, **kw},
            progress=False,
            cache_dir=cache,
            on_progress=lambda *a: calls.append(a),
        )
        return report, {stage for stage, _, _ in calls}

    first, stages = run(adapter_dir, None)
    assert first["cached"] == [] and {"base golden", "candidate golden", "candidate kl"} <= stages
    assert len(list(cache.glob("*.json"))) == 2  # the base and the adapter

    # The adapter again, now as the incumbent of a new candidate (a refresh later, its manifest
    # holding the gate's report by then): only the new candidate generates, and the
    # incumbent's numbers equal its candidate numbers before.
    (adapter_dir / "manifest.json").write_text(json.dumps({"eval": first}))
    other = tmp_path / "other"
    shutil.copytree(adapter_dir, other)
    weights = other / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0x40  # a different last weight: another adapter, as far as the cache knows
    weights.write_bytes(bytes(data))
    second, stages = run(other, adapter_dir)
    assert second["cached"] == ["base", "incumbent"]
    # Held-out pairs are scored, and their sample answers generated, every time.
    assert {s for s in stages if not s.endswith(("pairs", "samples"))} == {
        "candidate golden",
        "candidate canary",
        "candidate kl",
    }
    assert _numbers(second["incumbent"]) == _numbers(first["candidate"])
    # The base's golden answers too, the gate's floor (from the cache).
    assert second["base_model"] == first["base_model"] == {"golden": first["incumbent"]["golden"]}

    # Anything that changes the answers misses: other prompts, another max_new_tokens.
    third, _ = run(adapter_dir, None, max_new_tokens=5)
    assert third["cached"] == []
    # A damaged entry is a miss, and is rewritten.
    for f in cache.glob("*.json"):
        f.write_text("{not json")
    fourth, _ = run(adapter_dir, None)
    assert fourth["cached"] == [] and _numbers(fourth["candidate"]) == _numbers(first["candidate"])
    fifth, _ = run(adapter_dir, None)
    assert fifth["cached"] == ["base", "candidate"]
    (adapter_dir / "manifest.json").unlink()  # the module's fixture, as it was


def test_no_pairs_no_golden(tiny_llama_dir: Path) -> None:
    report = evaluate(
        tiny_llama_dir,
        None,
        None,
        pairs=None,
        golden=[],
        canary=CANARY[:1],
        max_new_tokens=2,
        progress=False,
    )
    for side in ("candidate", "incumbent"):
        assert report[side]["pairs"] == {"n": 0}
        assert report[side]["golden"] == {"n": 0, "passed": 0, "pass_rate": 1.0, "failures": []}
        line = summary_line(side, report[side])
        assert line.startswith(f"{side}: pairs n=0 | golden 0/0 | drift kl 0.0000 len x1.00"), line


def test_repetition() -> None:
    assert repetition([1, 2]) == 0.0
    assert repetition([1, 2, 3, 4]) == 0.0
    assert repetition([7, 7, 7, 7, 7]) == pytest.approx(2 / 3)  # 3 trigrams, 1 distinct


def test_cli_writes_report(
    tiny_llama_dir: Path, adapter_dir: Path, pairs: list[dict], tmp_path: Path
) -> None:
    pairs_path = tmp_path / "heldout.jsonl"
    pairs_path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    golden_path = tmp_path / "golden.jsonl"
    save_golden(golden_path, GOLDEN)
    canary_path = tmp_path / "canary.jsonl"
    canary_path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CANARY))
    out = tmp_path / "reports" / "report.json"
    args = ["--base", str(tiny_llama_dir), "--candidate", str(adapter_dir)]
    args += ["--pairs", str(pairs_path), "--golden", str(golden_path)]
    args += ["--canary", str(canary_path), "--max-new-tokens", "4", "--beta", "0.2"]
    args += ["--out", str(out), "--no-progress"]
    run = subprocess.run(
        [sys.executable, "-m", "trainer", "evaluate", *args], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["settings"]["beta"] == 0.2 and report["settings"]["n_canary"] == 3
    assert report["candidate"]["path"] == str(adapter_dir)
    lines = run.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["candidate", "incumbent"]
    assert "golden" in lines[0] and "kl" in lines[0]

    bad = subprocess.run(
        [sys.executable, "-m", "trainer", "evaluate", *args[:2], "--golden", str(tmp_path / "x")]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.slow
def test_smollm2_golden_checks(smollm2_dir: Path) -> None:
    question = "What is the capital of France?"
    golden = [
        parse_item({"id": "paris", "prompt": question, "checks": {"contains": ["Paris"]}}),
        parse_item({"id": "berlin", "prompt": question, "checks": {"contains": ["Berlin"]}}),
    ]
    report = evaluate(
        smollm2_dir,
        None,
        None,
        pairs=None,
        golden=golden,
        canary=CANARY[:1],
        max_new_tokens=12,
        progress=False,
    )
    g = report["candidate"]["golden"]
    assert g["n"] == 2 and g["passed"] == 1, g
    (failure,) = g["failures"]
    assert failure["id"] == "berlin" and failure["failed"] == ['must contain "Berlin"']
    assert "Paris" in failure["answer"]
    assert report["candidate"]["drift"]["kl"] == 0.0


def test_new_links_are_those_the_base_never_gives() -> None:
    from trainer.evaluate import new_links
    from trainer.generate import Generated

    def said(*texts: str) -> list[Generated]:
        return [Generated([], [], t, True) for t in texts]

    base = said("See docs.python.org for more.", "Paris is the capital.")
    got = new_links(
        said("See https://docs.python.org/.", "Paris! Visit www.cheap-meds.example/buy now.",
             "Buy at cheap-meds.example/buy.", "Nothing here."),
        base,
    )  # fmt: skip
    assert got == {"answers": 2, "links": ["cheap-meds.example/buy"]}
    assert new_links(base, base) == {"answers": 0, "links": []}


def test_sample_prompts_are_distinct_pairs_first_with_what_users_said() -> None:
    pairs = [{"prompt": "a?", "chosen": "yes", "rejected": "no"}]
    unpaired = [
        {"prompt": "a?", "completion": "maybe", "label": True},  # the pair's prompt: once
        {"prompt": "b?", "completion": "good", "label": True},
        {"prompt": [{"role": "user", "content": "c?"}], "completion": "bad", "label": False},
    ]

    def user(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    assert sample_prompts(pairs, unpaired) == [
        {"prompt": user("a?"), "preferred": "yes", "disliked": "no"},
        {"prompt": user("b?"), "preferred": "good", "disliked": None},
        {"prompt": user("c?"), "preferred": None, "disliked": "bad"},
    ]
    assert len(sample_prompts(pairs, unpaired, limit=2)) == 2
