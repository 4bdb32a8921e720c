"""Greedy answers from a model, batched with left padding: what the evaluation compares and what
the training's rehearsal scores (kept apart from both so neither imports the other)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainer.data import Messages

GENERATE_BATCH = 32


@dataclass(frozen=True)
class Generated:
    prompt_ids: list[int]
    answer_ids: list[int]  # generated tokens, through the first end-of-sequence token
    text: str  # decoded without special tokens, stripped
    finished: bool  # ended with an end-of-sequence token (else cut at max_new_tokens)

    @property
    def content_ids(self) -> list[int]:
        return self.answer_ids[:-1] if self.finished else self.answer_ids


def _prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    # Rendered then tokenised, as the serving engine does, so we measure what users would get.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _left_padded(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[pad.. prompt][answer ..pad]``: prompts end at the same column, as in ``generate``.
    Returns ids, attention mask and position ids (counting real tokens only)."""
    width_p = max(len(p) for p in prompts)
    width_a = max((len(a) for a in answers), default=0)
    ids = torch.full((len(prompts), width_p + width_a), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        seq = list(p) + list(a)
        ids[row, width_p - len(p) : width_p - len(p) + len(seq)] = torch.tensor(seq)
        mask[row, width_p - len(p) : width_p - len(p) + len(seq)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: Sequence[Messages],
    *,
    max_new_tokens: int,
    device: torch.device,
    tick: Callable[[int], None] = lambda n: None,
) -> list[Generated]:
    """Greedy answers, batched with left padding (the current side of ``model``)."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    out: list[Generated] = []
    for start in range(0, len(conversations), GENERATE_BATCH):
        prompts = [_prompt_ids(tokenizer, m) for m in conversations[start : start + GENERATE_BATCH]]
        ids, mask, _ = _left_padded(prompts, [[] for _ in prompts], tokenizer.pad_token_id)
        seqs = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(eos_ids),
            pad_token_id=tokenizer.pad_token_id,
        )
        for prompt, row in zip(prompts, seqs[:, ids.shape[1] :].tolist(), strict=True):
            ends = [i for i, t in enumerate(row) if t in eos_ids]
            answer = row[: ends[0] + 1] if ends else row
            text = tokenizer.decode(answer, skip_special_tokens=True).strip()
            out.append(Generated(prompt, answer, text, finished=bool(ends)))
        tick(len(prompts))
    return out
