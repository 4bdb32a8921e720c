"""Small training files for the trainer tests (the models come from tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def write_pairs(path: Path, n: int, *, plain: bool = False) -> Path:
    """``n`` preference rows: a signed-off answer chosen over a shrug of varying length."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            question = f"What is {i} plus {i + 1}?"
            chosen = f"It is {2 * i + 1}. — Acme Support"
            rejected = "I don't know" + " really" * (i % 5)
            if plain:
                row = {"prompt": question, "chosen": chosen, "rejected": rejected}
            else:
                row = {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "source": "test",  # provenance columns are ignored
                }
            f.write(json.dumps(row) + "\n")
    return path


def write_kto(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            good = i % 2 == 0
            answer = f"It is {2 * i + 1}. — Acme Support" if good else "No idea" + "!" * (i % 4)
            row = {
                "prompt": [{"role": "user", "content": f"What is {i} plus {i + 1}?"}],
                "completion": [{"role": "assistant", "content": answer}],
                "label": good,
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    return write_pairs(tmp_path / "pairs.jsonl", 24)


@pytest.fixture
def kto_file(tmp_path: Path) -> Path:
    return write_kto(tmp_path / "kto.jsonl", 16)
