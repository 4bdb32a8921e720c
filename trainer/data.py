"""Training data: read TRL-style JSONL, tokenise with the chat template, group by length.

Rows are TRL's conversational format. Preference (DPO) rows::

    {"prompt": [{"role": "user", "content": "..."}, ...],
     "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}],
     "weight": 1.0}                      # optional; scales this example's loss

Unpaired (KTO) rows::

    {"prompt": [...], "completion": [{"role": "assistant", ...}], "label": true}

A file may hold both kinds: a refresh trains a segment's pairs and its lone thumbs in one run.
Plain strings are accepted too and read as one user turn and one assistant turn, since prefloop
only trains chat models. Other columns (provenance from ``trainer.records``) are ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Tokens:
    """One tokenised prompt + completion; ``prompt_len`` tokens of ``ids`` are the prompt."""

    ids: tuple[int, ...]
    prompt_len: int

    @property
    def completion_len(self) -> int:
        return len(self.ids) - self.prompt_len


@dataclass(frozen=True)
class PairExample:
    chosen: Tokens
    rejected: Tokens
    weight: float = 1.0

    @property
    def length(self) -> int:
        return max(len(self.chosen.ids), len(self.rejected.ids))


@dataclass(frozen=True)
class KTOExample:
    """``mismatched`` is this prompt with another row's completion: KTO's KL estimate uses it."""

    completion: Tokens
    mismatched: Tokens
    label: bool
    weight: float = 1.0

    @property
    def length(self) -> int:
        return max(len(self.completion.ids), len(self.mismatched.ids))


Example = PairExample | KTOExample


class DataError(ValueError):
    """A row of the training file is malformed."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not JSON ({e})") from e
    return rows


def _as_messages(value: Any, role: str) -> Messages:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    raise DataError(f"expected a string or a list of messages, got {type(value).__name__}")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _ids(tokenizer: Any, messages: Messages, *, generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt
    )
    # transformers 5 returns a BatchEncoding; older versions a plain list.
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def tokenize_sequence(
    tokenizer: Any, prompt: Messages, completion: Messages, max_length: int
) -> Tokens | None:
    """Prompt + completion ids, prompt tokens counted; None when the prompt leaves no room.

    The completion starts where the tokenised prompt (with generation prompt) and the tokenised
    conversation diverge, as in TRL: templates may render the last turn differently when it is
    not last. Too-long sequences lose the end of the completion (TRL's ``keep_start``).
    """
    prompt_ids = _ids(tokenizer, prompt, generation_prompt=True)
    full_ids = _ids(tokenizer, prompt + completion, generation_prompt=False)
    prompt_len = common_prefix(prompt_ids, full_ids)
    if prompt_len >= max_length or prompt_len == len(full_ids):
        return None
    return Tokens(ids=tuple(full_ids[:max_length]), prompt_len=prompt_len)


def _splice(prompt_of: Tokens, completion_of: Tokens, max_length: int) -> Tokens:
    """One row's prompt with another row's completion tokens (the chat template renders the
    assistant turn the same whatever came before, so the ids can be joined directly)."""
    ids = prompt_of.ids[: prompt_of.prompt_len] + completion_of.ids[completion_of.prompt_len :]
    return Tokens(ids=ids[:max_length], prompt_len=prompt_of.prompt_len)


def row_kind(row: dict[str, Any]) -> str:
    """The row's kind: "pairs" for a preference row (it has ``chosen``), "kto" for an unpaired
    one (it has ``completion``)."""
    if "chosen" in row or "rejected" in row:
        return "pairs"
    if "completion" in row:
        return "kto"
    raise DataError("neither a preference row (chosen, rejected) nor an unpaired one (completion)")


def data_kind(examples: Sequence[Example]) -> str:
    """What a run trains on: "pairs", "kto", or "mixed" (pairs and unpaired rows together)."""
    kinds = {"pairs" if isinstance(e, PairExample) else "kto" for e in examples}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def load_examples(
    path: Path, tokenizer: Any, *, max_length: int, kind: str | None = None
) -> tuple[list[Example], int]:
    """Tokenised examples, in file order, and how many rows were dropped because their prompt
    alone reaches ``max_length``. A file may hold preference and unpaired rows together (a
    refresh trains a segment's pairs and lone thumbs in one run); ``kind`` "pairs" or "kto"
    insists on one."""
    examples: list[Example | None] = []
    singles: list[tuple[int, Tokens, bool, float]] = []
    dropped = 0
    for i, row in enumerate(read_rows(path)):
        try:
            if not isinstance(row, dict):
                raise DataError(f"expected an object, got {type(row).__name__}")
            this = row_kind(row)
            if kind is not None and this != kind:
                want = "a preference" if kind == "pairs" else "an unpaired (KTO)"
                raise DataError(
                    f"expected {want} row only; a file of pairs and thumbs together trains "
                    "with a paired loss (dpo, ...), its unpaired rows with KTO"
                )
            prompt = _as_messages(row["prompt"], "user")
            if this == "pairs":
                chosen = _as_messages(row["chosen"], "assistant")
                rejected = _as_messages(row["rejected"], "assistant")
            else:
                completion = _as_messages(row["completion"], "assistant")
                label = row["label"]
                if not isinstance(label, bool):
                    raise DataError(f"label must be true or false, got {label!r}")
        except (KeyError, DataError) as e:
            raise DataError(f"{path} row {i}: not a training row ({e})") from e
        weight = float(row.get("weight", 1.0))
        if this == "kto":
            seq = tokenize_sequence(tokenizer, prompt, completion, max_length)
            if seq is None:
                dropped += 1
                continue
            singles.append((len(examples), seq, label, weight))
            examples.append(None)  # filled below, once every unpaired row is known
            continue
        c = tokenize_sequence(tokenizer, prompt, chosen, max_length)
        r = tokenize_sequence(tokenizer, prompt, rejected, max_length)
        if c is None or r is None:
            dropped += 1
            continue
        # One prompt for both, so a batch can run it once (``collate_pairs``); as in TRL, it
        # ends where either tokenisation first departs from the prompt's.
        p = min(c.prompt_len, r.prompt_len)
        examples.append(PairExample(Tokens(c.ids, p), Tokens(r.ids, p), weight))
    # A fixed mismatch (unpaired row i's prompt, row i+1's completion) keeps the reference
    # log-probs of KTO's KL sequences computable once, up front, like every other one.
    for k, (at, seq, label, weight) in enumerate(singles):
        other = singles[(k + 1) % len(singles)][1]
        examples[at] = KTOExample(seq, _splice(seq, other, max_length), label, weight)
    return [e for e in examples if e is not None], dropped


def split_heldout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, held-out): a seeded random ``fraction`` held out, none below 10 rows."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_heldout = int(n * fraction) if n >= 10 else 0
    return sorted(order[n_heldout:]), sorted(order[:n_heldout])


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, group_factor: int = 50
) -> list[list[int]]:
    """Batches of indices with similar lengths, in a seeded random order.

    Shuffle, cut into groups of ``group_factor`` batches, sort each group by length (longest
    first) and cut it into batches, then shuffle the batches. Similar lengths mean little padding;
    the group keeps some randomness in which examples meet; the final shuffle keeps long batches
    from all coming first. Same seed, same batches: resuming relies on it.
    """
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    group = batch_size * group_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


@dataclass
class Batch:
    """Right-padded rows for one forward, and which hidden states score which tokens.

    Completion token ``k`` is scored from the hidden state at ``(score_rows[k], score_cols[k])``
    (the position before it), against ``score_targets[k]``, and its log-prob is added to
    sequence ``score_seqs[k]``. A row may hold more than one sequence (``collate_pairs``).
    """

    input_ids: torch.Tensor  # (rows, width)
    attention_mask: torch.Tensor  # (rows, width) padding mask, or (rows, 1, width, width) bool
    position_ids: torch.Tensor  # (rows, width)
    score_rows: torch.Tensor
    score_cols: torch.Tensor
    score_targets: torch.Tensor
    score_seqs: torch.Tensor
    n_seqs: int
    # Per scored token: True where a pair's chosen and rejected answers have parted (from their
    # first differing token on). The NLL of an operator's edit counts there only (rpo_span).
    score_diverged: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        tensors = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return Batch(**tensors, n_seqs=self.n_seqs)


def _plan(
    row: int, seq: int, ids: Sequence[int], first: int, last: int, prev: int
) -> list[tuple[int, int, int, int]]:
    """Score ``ids[first:last]`` (positions in the row); the first is predicted from ``prev``."""
    sources = [prev, *range(first, last - 1)]
    return [(row, src, ids[t], seq) for src, t in zip(sources, range(first, last), strict=True)]


def _batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    plan: list[tuple[int, int, int, int]],
    n_seqs: int,
) -> Batch:
    rows, cols, targets, seqs = torch.tensor(plan, dtype=torch.long).T
    return Batch(input_ids, attention_mask, position_ids, rows, cols, targets, seqs, n_seqs)


def collate(seqs: Sequence[Tokens], pad_id: int) -> Batch:
    """One sequence per row (KTO rows, or any list of sequences)."""
    width = max(len(s.ids) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    plan = []
    for row, s in enumerate(seqs):
        input_ids[row, : len(s.ids)] = torch.tensor(s.ids)
        attention_mask[row, : len(s.ids)] = 1
        plan += _plan(row, row, s.ids, s.prompt_len, len(s.ids), s.prompt_len - 1)
    position_ids = torch.arange(width).expand(len(seqs), width)
    return _batch(input_ids, attention_mask, position_ids, plan, len(seqs))


def collate_pairs(pairs: Sequence[PairExample], pad_id: int) -> Batch:
    """One row per pair, the prompt once: ``[prompt][chosen][rejected]``.

    Chosen and rejected share their prompt, so it is run once instead of twice (on chat data
    the system prompt and question are often half the tokens). The rejected tokens take the
    positions right after the prompt and a mask hides the chosen tokens from them, so every
    token sees exactly what it would see in its own sequence. Sequences 0..n-1 are the chosen
    answers, n..2n-1 the rejected ones, like TRL's concatenated batch, so results ``chunk(2)``.
    """
    n = len(pairs)
    lengths = [
        e.chosen.prompt_len + e.chosen.completion_len + e.rejected.completion_len for e in pairs
    ]
    width = max(lengths)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    allowed = torch.zeros((n, 1, width, width), dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    plan_chosen, plan_rejected = [], []
    diverged_chosen, diverged_rejected = [], []
    for row, e in enumerate(pairs):
        p, c, r = e.chosen.prompt_len, e.chosen.completion_len, e.rejected.completion_len
        assert e.chosen.ids[:p] == e.rejected.ids[:p], "a pair's two sequences share a prompt"
        shared = common_prefix(e.chosen.ids[p:], e.rejected.ids[p:])
        diverged_chosen += [k >= shared for k in range(c)]
        diverged_rejected += [k >= shared for k in range(r)]
        ids = e.chosen.ids + e.rejected.ids[p:]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        position_ids[row, : p + c] = torch.arange(p + c)
        position_ids[row, p + c : p + c + r] = torch.arange(p, p + r)
        allowed[row, 0, : len(ids), : len(ids)] = causal[: len(ids), : len(ids)]
        allowed[row, 0, p + c : p + c + r, p : p + c] = False  # rejected never sees chosen
        plan_chosen += _plan(row, row, ids, p, p + c, p - 1)
        plan_rejected += _plan(row, n + row, ids, p + c, p + c + r, p - 1)
    # Padding rows attend to themselves only, so no query row is all-masked (NaN in SDPA).
    pad = torch.arange(width)
    allowed[:, 0, pad, pad] = True
    batch = _batch(input_ids, allowed, position_ids, plan_chosen + plan_rejected, 2 * n)
    batch.score_diverged = torch.tensor(diverged_chosen + diverged_rejected, dtype=torch.bool)
    return batch
