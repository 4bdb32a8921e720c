"""Reading and tokenising training rows; length-grouped batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer.conftest import write_pairs
from trainer.data import (
    DataError,
    KTOExample,
    PairExample,
    collate,
    collate_pairs,
    length_grouped_batches,
    load_examples,
    split_heldout,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_pairs_are_tokenised_with_the_chat_template(tokenizer, pairs_file: Path) -> None:
    examples, dropped = load_examples(pairs_file, tokenizer, kind="pairs", max_length=256)
    assert dropped == 0 and len(examples) == 24
    e = examples[0]
    assert isinstance(e, PairExample)
    prompt = tokenizer.decode(e.chosen.ids[: e.chosen.prompt_len])
    assert prompt.endswith("<|im_start|>assistant\n"), "the prompt ends with the generation prompt"
    assert "What is 0 plus 1?" in prompt
    assert tokenizer.decode(e.chosen.ids[e.chosen.prompt_len :]).startswith("It is 1. — Acme")
    assert e.chosen.ids[: e.chosen.prompt_len] == e.rejected.ids[: e.rejected.prompt_len]


def test_plain_strings_read_as_one_user_and_one_assistant_turn(tokenizer, tmp_path: Path) -> None:
    plain = write_pairs(tmp_path / "plain.jsonl", 3, plain=True)
    chat = write_pairs(tmp_path / "chat.jsonl", 3)
    a, _ = load_examples(plain, tokenizer, kind="pairs", max_length=256)
    b, _ = load_examples(chat, tokenizer, kind="pairs", max_length=256)
    assert a == b


def test_weight_column_and_too_long_rows(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    rows = [
        {"prompt": "short", "chosen": "yes", "rejected": "no", "weight": 0.5},
        {"prompt": "long " * 300, "chosen": "yes", "rejected": "no"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, dropped = load_examples(path, tokenizer, kind="pairs", max_length=64)
    assert dropped == 1 and len(examples) == 1 and examples[0].weight == 0.5


def test_long_completions_are_cut_at_max_length(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl"
    row = {"prompt": "hi", "chosen": "word " * 200, "rejected": "no"}
    path.write_text(json.dumps(row) + "\n")
    (e,), _ = load_examples(path, tokenizer, kind="pairs", max_length=64)
    assert len(e.chosen.ids) == 64 and e.chosen.completion_len > 0


def test_malformed_rows_say_where(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(DataError, match="row 0"):
        load_examples(path, tokenizer, kind="pairs", max_length=64)


def test_kto_rows_get_a_mismatched_completion(tokenizer, kto_file: Path) -> None:
    examples, _ = load_examples(kto_file, tokenizer, kind="kto", max_length=256)
    assert all(isinstance(e, KTOExample) for e in examples)
    first, second = examples[0], examples[1]
    assert first.label is True and second.label is False
    # Row 0's prompt with row 1's completion.
    m = first.mismatched
    assert m.ids[: m.prompt_len] == first.completion.ids[: first.completion.prompt_len]
    assert m.ids[m.prompt_len :] == second.completion.ids[second.completion.prompt_len :]


def test_collate_scores_only_completion_tokens(tokenizer, pairs_file: Path) -> None:
    examples, _ = load_examples(pairs_file, tokenizer, kind="pairs", max_length=256)
    seqs = [examples[0].chosen, examples[4].rejected]
    batch = collate(seqs, pad_id=tokenizer.pad_token_id)
    for row, s in enumerate(seqs):
        mine = batch.score_rows == row
        assert mine.sum() == s.completion_len
        assert batch.score_cols[mine].tolist() == list(range(s.prompt_len - 1, len(s.ids) - 1))
        assert batch.score_targets[mine].tolist() == list(s.ids[s.prompt_len :])
        assert batch.attention_mask[row].sum() == len(s.ids)


def test_collate_pairs_runs_the_prompt_once(tokenizer, pairs_file: Path) -> None:
    examples, _ = load_examples(pairs_file, tokenizer, kind="pairs", max_length=256)
    e = examples[2]
    batch = collate_pairs([e], pad_id=tokenizer.pad_token_id)
    p, c, r = e.chosen.prompt_len, e.chosen.completion_len, e.rejected.completion_len
    assert batch.input_ids.shape == (1, p + c + r) and batch.n_seqs == 2
    # Rejected tokens continue the prompt's positions and cannot see the chosen tokens.
    assert batch.position_ids[0, p + c :].tolist() == list(range(p, p + r))
    mask = batch.attention_mask[0, 0]
    assert not mask[p + c :, p : p + c].any() and mask[p + c :, :p].all()
    # Both answers' first tokens are scored from the last prompt token.
    first_rejected = (batch.score_seqs == 1).nonzero()[0, 0]
    assert batch.score_cols[0] == p - 1 and batch.score_cols[first_rejected] == p - 1


def test_length_grouped_batches() -> None:
    lengths = [(i * 37) % 101 for i in range(200)]
    batches = length_grouped_batches(lengths, 8, seed=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(200)), "every example exactly once"
    assert batches == length_grouped_batches(lengths, 8, seed=3), "same seed, same batches"
    assert batches != length_grouped_batches(lengths, 8, seed=4)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread / len(batches) < 5, "examples in a batch have similar lengths"


def test_heldout_split() -> None:
    train, heldout = split_heldout(50, 0.1, seed=0)
    assert len(heldout) == 5 and sorted(train + heldout) == list(range(50))
    assert split_heldout(50, 0.1, seed=0) == (train, heldout)
    assert split_heldout(8, 0.5, seed=0)[1] == [], "no held-out split below 10 rows"
