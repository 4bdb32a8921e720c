"""Rehearsal, against forgetting what the pairs never mention: the reference's own greedy answers
to unrelated prompts keep their log-probs (``TrainConfig.rehearsal``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.data import Tokens, collate
from trainer.distributed import Dist
from trainer.generate import generate
from trainer.logps import per_sequence, token_logps
from trainer.model import autocast

REHEARSAL_PROMPTS = Path(__file__).with_name("rehearsal.jsonl")


@dataclass(frozen=True)
class Rehearsal:
    """The reference's greedy answers to the rehearsal prompts and their per-token log-probs
    (in ``collate``'s scoring order, one tensor per answer)."""

    seqs: list[Tokens]
    ref: list[torch.Tensor]

    def save(self, path: Path) -> None:
        saved = {
            "ids": [list(t.ids) for t in self.seqs],
            "prompt_lens": [t.prompt_len for t in self.seqs],
        }
        torch.save(saved | {"ref": self.ref}, path)

    @classmethod
    def load(cls, path: Path) -> Rehearsal:
        saved = torch.load(path, weights_only=True)
        pieces = zip(saved["ids"], saved["prompt_lens"], strict=True)
        return cls([Tokens(tuple(ids), p) for ids, p in pieces], saved["ref"])


def load_rehearsal_prompts(path: Path) -> list[list[dict[str, Any]]]:
    """JSONL rows ``{"prompt": "..."}`` or ``{"prompt": [messages]}``."""
    prompts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f'{path}:{n}: expected {{"prompt": ...}} ({e})') from e
        prompts.append([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
    if not prompts:
        raise ValueError(f"{path}: no rehearsal prompts")
    return prompts


def prepare_rehearsal(
    model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig, d: Dist, pad_id: int, *,
    saved: Path, prompts: Path | None, resume: bool, fresh_lora: bool,
) -> Rehearsal | None:  # fmt: skip
    """The rehearsal answers: from ``saved`` when resuming (a warm start's reference may be
    gone), else generated from ``prompts`` (default: the shipped set) and saved there."""
    if not cfg.rehearsal:
        return None
    if resume and saved.exists():
        return Rehearsal.load(saved)
    texts = load_rehearsal_prompts(prompts or REHEARSAL_PROMPTS)
    rehearsal = rehearsal_answers(model, tokenizer, texts, cfg, d, pad_id, fresh_lora=fresh_lora)
    if d.main:
        rehearsal.save(saved)
    return rehearsal


@torch.no_grad()
def rehearsal_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, Any]]],
    cfg: TrainConfig,
    d: Dist,
    pad_id: int,
    *,
    fresh_lora: bool,
) -> Rehearsal:
    """Generate and score the rehearsal answers with the reference (as ``reference_logps``)."""
    model.eval()
    with model.disable_adapter() if fresh_lora else nullcontext():
        answers = generate(
            model, tokenizer, prompts, max_new_tokens=cfg.rehearsal_tokens, device=d.device
        )
        # The end-of-answer token is kept: where the reference stops is behaviour too.
        seqs = [Tokens(tuple(a.prompt_ids + a.answer_ids), len(a.prompt_ids)) for a in answers]
        ref = []
        with autocast(d.device, cfg):
            for start in range(0, len(seqs), cfg.micro_batch_size):
                part = seqs[start : start + cfg.micro_batch_size]
                tokens = token_logps(model, collate(part, pad_id).to(d.device), cfg.logits_chunk)
                ref += list(tokens.float().cpu().split([s.completion_len for s in part]))
    return Rehearsal(seqs, ref)


def rehearsal_penalty(
    model: torch.nn.Module, rehearsal: Rehearsal, idx: Sequence[int], cfg: TrainConfig, d: Dist,
    pad_id: int,
) -> torch.Tensor:  # fmt: skip
    """Mean over the answers ``idx`` of the per-token (log pi - log pi_ref)^2."""
    batch = collate([rehearsal.seqs[i] for i in idx], pad_id).to(d.device)
    tokens = token_logps(model, batch, cfg.logits_chunk)
    ref = torch.cat([rehearsal.ref[i] for i in idx]).to(d.device)
    sums, counts = per_sequence(batch, (tokens - ref).square())
    return (sums / counts.clamp(min=1)).mean()


def rehearsal_batch(n: int, step: int, cfg: TrainConfig, d: Dist) -> list[int]:
    """This process's rehearsal answers for ``step``: a seeded order, cycled (so resumable)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    first = (step * d.world + d.rank) * cfg.rehearsal_batch
    return [order[(first + k) % n] for k in range(min(cfg.rehearsal_batch, n))]
