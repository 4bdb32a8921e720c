"""The whole lifecycle: a trained adapter goes candidate -> gated -> active -> served, and one
trained on flipped labels is rejected by the gate with readable reasons (through the `prefloop
adapters` CLI, as an operator would run it). On the tiny random model: the registry, the gate's
rules, the CLI and serving are the point here; that training on the real SmolLM2 changes its
answers and passes the gate is tests/trainer/test_learning_gate.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from adapters.registry import ACTIVE, APPROVED, REJECTED, Registry
from service.core.config import Settings
from service.loop.refresh import gate_version
from service.main import create_app
from service.storage.db import init_db, make_engine
from tests.servers import serve_thread
from trainer.dpo import TrainConfig, train

FACTS = [
    ("What is the capital of France?", "Paris."),
    ("What colour is the sky on a clear day?", "Blue."),
    ("How many legs does a spider have?", "Eight."),
    ("What is 2 + 2?", "4."),
    ("Which planet is known as the red planet?", "Mars."),
    ("What do bees make?", "Honey."),
    ("What is frozen water called?", "Ice."),
    ("How many days are in a week?", "Seven."),
    ("What is the opposite of hot?", "Cold."),
    ("Which animal barks?", "A dog."),
    ("What gas do plants take in?", "Carbon dioxide."),
    ("What is the largest ocean?", "The Pacific."),
    ("How many hours are in a day?", "24."),
    ("What colour are bananas when ripe?", "Yellow."),
    ("What is the boiling point of water in Celsius?", "100 degrees."),
    ("Who wrote Romeo and Juliet?", "Shakespeare."),
    ("What is the capital of Japan?", "Tokyo."),
    ("How many continents are there?", "Seven."),
    ("What do cows drink?", "Water."),
    ("What is the tallest animal?", "The giraffe."),
    ("What shape has three sides?", "A triangle."),
    ("What is the currency of the USA?", "The dollar."),
    ("What is the chemical symbol for gold?", "Au."),
    ("How many minutes are in an hour?", "60."),
    # held out
    ("What is the capital of Italy?", "Rome."),
    ("How many wheels does a bicycle have?", "Two."),
    ("What colour is grass?", "Green."),
    ("What is 10 minus 3?", "7."),
    ("Which star is closest to Earth?", "The Sun."),
    ("What do caterpillars become?", "Butterflies."),
    ("What is the capital of Spain?", "Madrid."),
    ("How many sides does a square have?", "Four."),
]
RAMBLE = (
    "Well, that is a really interesting question, and there is a lot one could say about it, "
    "so let me take a moment to think it through carefully before answering. {a} "
    "I hope this long and winding explanation was helpful to you in some way!"
)


def rows(facts: list[tuple[str, str]], flipped: bool = False) -> list[dict]:
    out = []
    for q, a in facts:
        short, long = a, RAMBLE.format(a=a)
        chosen, rejected = (long, short) if flipped else (short, long)
        out.append(
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return out


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.mark.slow
def test_trained_adapter_is_gated_promoted_and_served_and_a_flipped_one_rejected(
    tiny_llama_dir: Path, tmp_path: Path, db_url: str
) -> None:
    model_dir = tiny_llama_dir
    settings = Settings(
        home=tmp_path, model=str(model_dir), database_url=db_url, eval_max_new_tokens=32,
        golden_include_shipped=False,  # this test's own two items
    )  # fmt: skip
    golden = [
        {"id": "capital-fr", "prompt": "What is the capital of France?",
         "checks": {"contains": ["Paris"], "max_chars": 400}},
        {"id": "hello", "prompt": "Say hello.", "checks": {"not_contains": ["Paris"]}},
    ]  # fmt: skip
    write_jsonl(settings.golden_file, golden)
    train_facts, heldout_facts = FACTS[:24], FACTS[24:]
    heldout = rows(heldout_facts)
    cfg = TrainConfig(lr=2e-4, epochs=2, batch_size=8, max_length=128, eval_fraction=0.0,
                      checkpoint_every=0)  # fmt: skip

    db = make_engine(settings)
    init_db(db)
    registry = Registry(db, settings.adapters_dir)

    # A good adapter: prefers the short answers, as users did.
    good_dir = tmp_path / "runs" / "good"
    pairs = write_jsonl(tmp_path / "good.jsonl", rows(train_facts))
    train(cfg, pairs=pairs, base=model_dir, out=good_dir, progress_bar=False)
    good = registry.register(good_dir, base_model=str(model_dir), actor="test")
    row, verdict = gate_version(settings, registry, good.id, heldout=heldout, progress=False)
    print("good adapter:", *(c.detail for c in verdict.checks), sep="\n  ")  # -rP shows it
    assert verdict.approved, verdict.reasons
    assert row.status == APPROVED
    assert row.status_reason == "passed the gate against the base model"
    report = registry.get(good.id).eval_report
    assert report["candidate"]["pairs"]["accuracy"] > 0.55
    assert report["incumbent"]["pairs"]["accuracy"] == 0.5  # the base model scores ties
    # Nothing the base model got right is lost (a random model gets `hello` only).
    assert report["candidate"]["golden"]["pass_rate"] == report["base_model"]["golden"]["pass_rate"]
    manifest = json.loads((Path(row.path) / "manifest.json").read_text())
    assert manifest["verdict"]["approved"] is True and manifest["eval"] == report
    registry.promote(good.id, actor="test", reason="passed the gate")

    # A poisoned one: the same data with the labels flipped. Gated through the CLI.
    bad_dir = tmp_path / "runs" / "flipped"
    pairs = write_jsonl(tmp_path / "flipped.jsonl", rows(train_facts, flipped=True))
    train(cfg, pairs=pairs, base=model_dir, out=bad_dir, progress_bar=False)
    env = {
        **os.environ,
        "PREFLOOP_HOME": str(tmp_path),
        "PREFLOOP_MODEL": str(model_dir),
        "PREFLOOP_DATABASE_URL": db_url,
        "PREFLOOP_EVAL_MAX_NEW_TOKENS": "32",
        "PREFLOOP_GOLDEN_INCLUDE_SHIPPED": "false",
    }

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "service", "adapters", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    out = cli("register", str(bad_dir))
    assert out.returncode == 0, out.stderr
    bad_id = out.stdout.split()[0]
    assert bad_id == "default@v2"
    out = cli("gate", bad_id, "--pairs", str(write_jsonl(tmp_path / "heldout.jsonl", heldout)))
    assert out.returncode == 0, out.stderr
    print("flipped adapter:", out.stdout, sep="\n")
    assert "[FAIL] held-out pair accuracy 0." in out.stdout
    assert f"{bad_id} rejected" in out.stdout
    bad = registry.get(bad_id)
    assert bad.status == REJECTED
    assert bad.status_reason.startswith(
        "failed the gate against default@v1: held-out pair accuracy 0."
    )
    assert bad.eval_report["candidate"]["pairs"]["margin"] < 0
    out = cli("promote", bad_id)
    assert out.returncode == 1 and "rejected; it cannot become active" in out.stderr
    out = cli("list")
    assert f"{good.id}" in out.stdout and "active" in out.stdout

    # Served: the base model's name reaches the active version; the rejected one is not loaded.
    with serve_thread(create_app(settings)) as base_url:
        r = httpx.post(
            f"{base_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "What is the capital of Italy?"}],
                  "max_tokens": 24, "temperature": 0},
            timeout=120,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["adapter_version"] == good.id
        r = httpx.post(
            f"{base_url}/v1/chat/completions",
            json={"model": bad_id, "messages": [{"role": "user", "content": "Hi"}]},
            timeout=60,
        )
        assert r.status_code == 404
    assert registry.get(good.id).status == ACTIVE
    db.dispose()
