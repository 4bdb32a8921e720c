"""LoRA preference training (DPO and its variants, KTO), as one loop you can read top to bottom.

    python -m trainer train --pairs pairs.jsonl --base MODEL_DIR --out ADAPTER_DIR [--loss dpo]
    torchrun --nproc-per-node 2 -m trainer train ...          # data-parallel, same arguments

Modes (docs/scale.md): ``--base-dtype bf16`` and ``--quantize nf4`` (QLoRA) for the frozen base
(``trainer.model``), ``--distributed fsdp2`` to shard it across processes
(``trainer.distributed``). Checkpoints and the adapter directory: ``trainer.checkpoint``;
rehearsal: ``trainer.rehearsal``.

What happens, in order (``train``):

1. Read and tokenise the rows (``trainer.data``), hold out a seeded fraction for evaluation.
   A file may mix preference rows (trained with ``loss``) and unpaired thumbs rows (trained with
   KTO, weighted for unbalanced ups and downs), one objective summed over a batch.
2. Load the base model and add LoRA, or warm-start from a parent adapter (the "online" case: the
   reference is the parent, and the policy starts from it).
3. Compute every reference log-prob once, up front: the adapter disabled (fresh LoRA) or the
   parent adapter as loaded. Training then needs one forward per batch, not two.
4. Train: length-grouped batches, one forward over chosen+rejected concatenated, logits only at
   completion positions, gradient accumulation, warmup + cosine decay, clipping. Metrics go to
   ``metrics.jsonl``, tqdm and an optional progress callback; checkpoints allow an exact resume.
5. Save a PEFT adapter directory plus ``manifest.json``, atomically: everything is written to
   ``.<name>.partial`` next to the output and renamed into place at the end.

Memory: the LM head of a small model dominates activations (SmolLM2: 49k vocab x 576). We never
build ``(batch, length, vocab)`` logits: hidden states are gathered at completion positions and
pushed through the head a chunk at a time, with the gradient of the head's input computed in the
same pass (``_SelectedLogProbs``), so one chunk of logits is the most ever held.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from trainer import losses
from trainer.checkpoint import (
    last_eval,
    load_checkpoint,
    log,
    save_adapter,
    save_checkpoint,
    truncate_log,
)
from trainer.config import BASE_DTYPES, QUANTIZE, TrainConfig
from trainer.data import (
    Batch,
    Example,
    PairExample,
    Tokens,
    collate,
    collate_pairs,
    common_prefix,
    data_kind,
    file_sha256,
    length_grouped_batches,
    load_examples,
    split_heldout,
)
from trainer.distributed import (
    DISTRIBUTED,
    Dist,
    all_reduce_mean_,
    all_reduce_sum_,
    barrier,
    full_tensor,
    full_trainable_state,
    setup_distributed,
    shard_fsdp2,
)
from trainer.logps import check_logits_path, completion_logps, per_sequence, token_logps
from trainer.model import autocast, load_policy, trainable
from trainer.rehearsal import prepare_rehearsal, rehearsal_batch, rehearsal_penalty

ProgressFn = Callable[[int, int, dict[str, float]], None]
"""Called after every optimizer step with (step, total steps, metrics)."""


@dataclass
class TrainResult:
    out: Path | None  # None on ranks other than 0, which write nothing
    metrics: dict[str, Any]
    model: torch.nn.Module = field(repr=False)


# --- losses over a batch ----------------------------------------------------------------------


def _halves(e: Example) -> tuple[Tokens, Tokens]:
    """(chosen, rejected) of a pair; (completion, mismatched completion) of a KTO row."""
    return (e.chosen, e.rejected) if isinstance(e, PairExample) else (e.completion, e.mismatched)


def _collate_halves(examples: Sequence[Example], pad_id: int) -> Batch:
    """Both halves of every example in one forward: sequences [firsts..., seconds...]."""
    if all(isinstance(e, PairExample) for e in examples):
        return collate_pairs(examples, pad_id)
    firsts, seconds = zip(*(_halves(e) for e in examples), strict=True)
    return collate([*firsts, *seconds], pad_id)


def make_paired_loss(cfg: TrainConfig) -> losses.PairedLoss:
    kwargs: dict[str, float] = {"beta": cfg.beta}
    if cfg.loss in losses.USES_LABEL_SMOOTHING:
        kwargs["label_smoothing"] = cfg.label_smoothing
    return functools.partial(losses.PAIRED_LOSSES[cfg.loss], **kwargs)


def kto_lambdas(cfg: TrainConfig, n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(lambda_D, lambda_U): the configured weights, scaled (``kto_balance``) so that
    lambda_D n_D / (lambda_U n_U) is in [1, 4/3]: scarce ups are weighted up, scarce downs
    weigh the ups down. A set of all ups (or all downs) is left as configured."""
    lam_d, lam_u = cfg.desirable_weight, cfg.undesirable_weight
    if not cfg.kto_balance or not n_desirable or not n_undesirable:
        return lam_d, lam_u
    ratio = lam_d * n_desirable / (lam_u * n_undesirable)
    if ratio < 1:
        lam_d /= ratio
    elif ratio > 4 / 3:
        lam_u *= ratio / (4 / 3)
    return lam_d, lam_u


@dataclass
class Rewards:
    """Implied rewards of one micro-batch: pairs' (chosen, rejected), unpaired rows' (desirable,
    undesirable)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    desirable: torch.Tensor
    undesirable: torch.Tensor


def batch_losses(
    model: torch.nn.Module,
    examples: Sequence[Example],
    ref: torch.Tensor,
    cfg: TrainConfig,
    d: Dist,
    pad_id: int,
    lambdas: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, Rewards]:
    """Per-example losses (in ``examples``' order) and rewards for one micro-batch: pairs with
    ``cfg.loss``, unpaired rows with KTO weighted by ``lambdas`` (lambda_D, lambda_U). ``ref``
    holds the reference log-probs of both halves of each example, shape (batch, 2[+shared])."""
    ref = ref.to(d.device)
    paired = [i for i, e in enumerate(examples) if isinstance(e, PairExample)]
    single = [i for i, e in enumerate(examples) if not isinstance(e, PairExample)]
    empty = torch.zeros(0, device=d.device)
    pair_loss, chosen, rejected = empty, empty, empty
    kto, desirable, undesirable = empty, empty, empty
    if paired:
        pair_loss, chosen, rejected = _pair_losses(
            model, [examples[i] for i in paired], ref[paired], cfg, d, pad_id
        )
    if single:
        lam = lambdas or (cfg.desirable_weight, cfg.undesirable_weight)
        kto, desirable, undesirable = _kto_losses(
            model, [examples[i] for i in single], ref[single], cfg, d, pad_id, lam
        )
    order = torch.tensor(paired + single, device=d.device).argsort()
    per_example = torch.cat([pair_loss, kto])[order]
    return per_example, Rewards(chosen, rejected, desirable, undesirable)


def _kto_losses(
    model: torch.nn.Module,
    examples: Sequence[Any],
    ref: torch.Tensor,
    cfg: TrainConfig,
    d: Dist,
    pad_id: int,
    lambdas: tuple[float, float],
) -> losses.LossOutput:
    batch = collate([e.completion for e in examples], pad_id).to(d.device)
    logps, _ = completion_logps(model, batch, cfg.logits_chunk)
    with torch.no_grad():  # the KL estimate is a detached reference point
        mismatched = collate([e.mismatched for e in examples], pad_id).to(d.device)
        kl_logps, _ = completion_logps(model, mismatched, cfg.logits_chunk)
        # Estimated per micro-batch, as in the paper; not averaged over processes, which may
        # hold different numbers of micro-batches in an epoch's last step.
        kl = (kl_logps - ref[:, 1]).mean()
    labels = torch.tensor([e.label for e in examples], device=d.device)
    return losses.kto_loss(
        logps, ref[:, 0], labels, kl, beta=cfg.beta,
        desirable_weight=lambdas[0], undesirable_weight=lambdas[1],
    )  # fmt: skip


def _pair_losses(
    model: torch.nn.Module,
    examples: Sequence[Any],
    ref: torch.Tensor,
    cfg: TrainConfig,
    d: Dist,
    pad_id: int,
) -> losses.LossOutput:
    # One forward for chosen and rejected together, the prompt run once; split after.
    batch = collate_pairs(examples, pad_id).to(d.device)
    tokens = token_logps(model, batch, cfg.logits_chunk)
    logps, counts = per_sequence(batch, tokens)
    policy_chosen, policy_rejected = logps.chunk(2)
    n_chosen, n_rejected = counts.chunk(2)
    ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
    if cfg.loss in losses.LENGTH_NORMALIZED:
        policy_chosen, policy_rejected = policy_chosen / n_chosen, policy_rejected / n_rejected
        ref_chosen, ref_rejected = ref_chosen / n_chosen, ref_rejected / n_rejected
    per_example, chosen_rewards, rejected_rewards = make_paired_loss(cfg)(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected
    )
    if cfg.rpo_alpha:
        # RPO (Pang et al. 2024, arXiv:2404.19733, Eq. 2): NLL of the chosen answer per token.
        # rpo_span "diverged": only the tokens after what chosen and rejected share. An edit
        # that appends a line to the model's own answer then teaches the line, not a sharper
        # copy of the sampled answer (which drifts the model); independent samples part at
        # once, so there it is plain RPO.
        nll_sums, nll_counts = logps, counts
        if cfg.rpo_span == "diverged":
            nll_sums, nll_counts = per_sequence(batch, tokens, batch.score_diverged)
        nll = nll_sums.chunk(2)[0] / nll_counts.chunk(2)[0].clamp(min=1)
        per_example = per_example - cfg.rpo_alpha * nll
    if cfg.anchor:
        n = len(examples)
        shared = _shared_tokens(batch, n)
        ref_tokens = torch.cat([ref[i, 2 : 2 + _n_shared(e)] for i, e in enumerate(examples)])
        moved = torch.zeros_like(tokens)
        moved[shared] = tokens[shared] - ref_tokens
        sums, counts = per_sequence(batch, moved.square(), shared)
        per_example = per_example + cfg.anchor * sums[:n] / counts[:n].clamp(min=1)
    return per_example, chosen_rewards, rejected_rewards


def _shared_tokens(batch: Batch, n_pairs: int) -> torch.Tensor:
    """Per scored token: a chosen answer's token before it parts from its rejected answer."""
    return ~batch.score_diverged & (batch.score_seqs < n_pairs)


def _n_shared(e: Example) -> int:
    if not isinstance(e, PairExample):
        return 0
    p = e.chosen.prompt_len
    return common_prefix(e.chosen.ids[p:], e.rejected.ids[p:])


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    examples: Sequence[Example],
    cfg: TrainConfig,
    d: Dist,
    pad_id: int,
    *,
    fresh_lora: bool,
) -> torch.Tensor:
    """Log-probs of both halves of every example under the reference, shape (n, 2); with
    ``cfg.anchor``, (n, 2 + longest shared part), each row followed by the per-token log-probs
    of the tokens its answers share (zero-padded).

    The reference is the policy as it starts: with a fresh LoRA that is the base model (adapter
    disabled: the fused kernels scale LoRA by 0, the stock layers skip it); warm-started, it is
    the parent adapter. Each
    process scores its share and the shares are summed into one table; under FSDP2, where
    every forward is a collective, every process scores every example.
    """
    width = max((_n_shared(e) for e in examples), default=0) if cfg.anchor else 0
    table = torch.zeros(len(examples), 2 + width)
    model.eval()  # the reference has no dropout
    share = (0, 1) if d.fsdp else (d.rank, d.world)
    mine = list(range(share[0], len(examples), share[1]))
    # Pairs, then unpaired rows (a micro-batch of one kind collates pairs with the prompt once),
    # longest first within each, so batches pad little.
    mine.sort(key=lambda i: (not isinstance(examples[i], PairExample), -examples[i].length))
    chunks = [
        mine[start : start + cfg.micro_batch_size]
        for start in range(0, len(mine), cfg.micro_batch_size)
    ]
    chunks = [part for idx in chunks for part in _by_kind(idx, examples)]
    with model.disable_adapter() if fresh_lora else nullcontext(), autocast(d.device, cfg):
        for idx in chunks:
            batch = _collate_halves([examples[i] for i in idx], pad_id).to(d.device)
            tokens = token_logps(model, batch, cfg.logits_chunk).float()
            logps, _ = per_sequence(batch, tokens)
            table[idx, :2] = torch.stack(logps.cpu().chunk(2), dim=1)
            if width:
                shared = tokens[_shared_tokens(batch, len(idx))].cpu()
                parts = shared.split([_n_shared(examples[i]) for i in idx])
                for i, part in zip(idx, parts, strict=True):
                    table[i, 2 : 2 + len(part)] = part
    if not d.fsdp:
        all_reduce_sum_(table, d)  # each row was filled by exactly one process
    return table


def _by_kind(idx: list[int], examples: Sequence[Example]) -> list[list[int]]:
    """``idx`` split into its pairs and its unpaired rows (either may be absent)."""
    pairs = [i for i in idx if isinstance(examples[i], PairExample)]
    singles = [i for i in idx if not isinstance(examples[i], PairExample)]
    return [part for part in (pairs, singles) if part]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: Sequence[Example],
    ref: torch.Tensor,
    cfg: TrainConfig,
    d: Dist,
    pad_id: int,
    lambdas: tuple[float, float] | None = None,
) -> dict[str, float]:
    """Mean loss, rewards, accuracy and margin over held-out examples (every process computes
    the same numbers: held-out sets are small)."""
    was_training = model.training
    model.eval()  # no LoRA dropout while measuring
    stats = torch.zeros(N_STATS, device=d.device)
    for start in range(0, len(examples), cfg.micro_batch_size):
        sl = slice(start, start + cfg.micro_batch_size)
        with autocast(d.device, cfg):
            per_example, rewards = batch_losses(
                model, examples[sl], ref[sl], cfg, d, pad_id, lambdas
            )
        stats += _stats(per_example, rewards)
    model.train(was_training)
    return _metrics(stats)


N_STATS = 12


def _stats(per_example: torch.Tensor, r: Rewards) -> torch.Tensor:
    """Sums to aggregate over micro-batches and processes before dividing (see ``_metrics``)."""

    def sum_n(x: torch.Tensor) -> list[torch.Tensor]:
        return [x.detach().float().sum(), torch.tensor(float(len(x)), device=x.device)]

    correct = (r.chosen > r.rejected).float()
    parts = [per_example, r.chosen, r.rejected, correct, r.desirable, r.undesirable]
    return torch.stack([t.to(per_example.device) for x in parts for t in sum_n(x)])


def _metrics(s: torch.Tensor) -> dict[str, float]:
    """Loss; pairs' rewards, margin and accuracy; unpaired rows' mean rewards and their gap
    (desirable - undesirable: how far apart training has pushed thumbs up and down). A run of
    unpaired rows only reports the gap as its margin, so every run has one to plot."""
    v = s.tolist()  # one device sync for all of them

    def mean(k: int) -> float | None:
        return v[k] / v[k + 1] if v[k + 1] else None

    out = {"loss": v[0] / max(v[1], 1)}
    chosen, rejected, desirable, undesirable = mean(2), mean(4), mean(8), mean(10)
    if v[3]:
        out |= {"rewards/chosen": chosen or 0.0, "rewards/rejected": rejected or 0.0}
        out["margin"] = out["rewards/chosen"] - out["rewards/rejected"]
        out["accuracy"] = mean(6) or 0.0
    if v[9] or v[11]:
        out["kto/desirable"], out["kto/undesirable"] = desirable or 0.0, undesirable or 0.0
        if v[9] and v[11]:
            out["kto_gap"] = out["kto/desirable"] - out["kto/undesirable"]
            out.setdefault("margin", out["kto_gap"])
    out.setdefault("margin", 0.0)
    return out


# --- schedule, checkpoints, output ------------------------------------------------------------


def get_lr(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


# --- the loop ---------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    pairs: Path,
    base: Path,
    out: Path,
    init_adapter: Path | None = None,
    resume: bool = False,
    on_progress: ProgressFn | None = None,
    progress_bar: bool = True,
    rehearsal_prompts: Path | None = None,
) -> TrainResult:
    """Train an adapter on ``pairs`` (preference rows and/or unpaired KTO rows) and
    write it to ``out``, which must not exist: adapter versions are immutable. With
    ``cfg.rehearsal``, ``rehearsal_prompts`` (default: trainer/rehearsal.jsonl) are rehearsed."""
    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    d = setup_distributed(cfg.distributed)
    out, base, pairs = Path(out), Path(base), Path(pairs)
    if out.exists():
        raise FileExistsError(f"{out} exists; adapter directories are never overwritten")
    work = out.parent / f".{out.name}.partial"  # same filesystem, so the final rename is atomic
    checkpoint, log_path = work / "checkpoint.pt", work / "metrics.jsonl"
    resume = resume and checkpoint.exists()
    if d.main and not resume:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    barrier(d)

    # 1. Data.
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    only = "kto" if cfg.loss == "kto" else None  # loss "kto": every row unpaired
    examples, dropped = load_examples(pairs, tokenizer, kind=only, max_length=cfg.max_length)
    assert examples, f"{pairs}: no usable rows ({dropped} dropped as too long)"
    kind, counts = data_kind(examples), _counts(examples)
    lambdas = kto_lambdas(cfg, counts["desirable"], counts["undesirable"])
    counts["kto_lambdas"] = list(lambdas)
    train_idx, heldout_idx = split_heldout(len(examples), cfg.eval_fraction, cfg.seed)
    data_sha256 = file_sha256(pairs)
    if d.fsdp and kind == "mixed":
        raise ValueError(
            "distributed fsdp2 trains one kind of row per run, pairs or thumbs (every process "
            "must run the same forwards); this file mixes both: use --distributed ddp"
        )

    # 2. Model, optimizer.
    model = load_policy(base, init_adapter, cfg, d.device, place=not d.fsdp)
    if d.fsdp:
        shard_fsdp2(model, d)
    check_logits_path(model, d.device)
    params = [p for _, p in trainable(model)]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    # 3. Reference log-probs, once (or from the checkpoint when resuming).
    step, seconds_reference = 0, 0.0
    if resume:
        step, ref = load_checkpoint(checkpoint, model, optimizer, cfg, data_sha256, d)
        if d.main:
            truncate_log(log_path, step)
    else:
        t_ref = time.perf_counter()
        ref = reference_logps(model, examples, cfg, d, pad_id, fresh_lora=init_adapter is None)
        seconds_reference = time.perf_counter() - t_ref
    t_ref = time.perf_counter()
    rehearsal_path = work / "rehearsal.pt"
    rehearsal = prepare_rehearsal(
        model, tokenizer, cfg, d, pad_id, saved=rehearsal_path, prompts=rehearsal_prompts,
        resume=resume, fresh_lora=init_adapter is None,
    )  # fmt: skip
    seconds_reference += time.perf_counter() - t_ref
    heldout = [examples[i] for i in heldout_idx]
    if heldout and not resume:
        eval_before = evaluate(model, heldout, ref[heldout_idx], cfg, d, pad_id, lambdas)
        if d.main:
            log(log_path, {"split": "eval", "step": 0, "epoch": 0, **eval_before})

    # 4. Train. Every process sees the same batch list; in each step process r takes batch r.
    n_batches = math.ceil(len(train_idx) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / d.world)
    total = steps_per_epoch * cfg.epochs
    lengths = [examples[i].length for i in train_idx]
    model.train()
    bar = tqdm(total=total, initial=step, desc="train", disable=not (d.main and progress_bar))
    last: dict[str, float] = {}
    tokens_seen, t_loop = 0, time.perf_counter()
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        batches = [
            [train_idx[i] for i in b]
            for b in length_grouped_batches(lengths, cfg.batch_size, seed=cfg.seed + epoch)
        ]
        # Fill the last step by repeating a few batches, so every process has the same work.
        batches += batches[: steps_per_epoch * d.world - len(batches)]
        for step_in_epoch in range(step - epoch * steps_per_epoch, steps_per_epoch):
            lr = get_lr(step, total, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_batches = batches[step_in_epoch * d.world : (step_in_epoch + 1) * d.world]
            mine = step_batches[d.rank]  # sorted by length already
            stats = torch.zeros(N_STATS, device=d.device)
            for idx, counted in _micro_batches(mine, step_batches, cfg, d):
                with autocast(d.device, cfg):
                    per_example, rewards = batch_losses(
                        model, [examples[i] for i in idx], ref[idx], cfg, d, pad_id, lambdas
                    )
                weights = torch.tensor([examples[i].weight for i in idx], device=d.device)
                # Callers reduce: weighted sum over the batch, divided by its size.
                ((counted * weights * per_example).sum() / len(mine)).backward()
                if counted:
                    stats += _stats(per_example, rewards)
                    tokens_seen += sum(len(s.ids) for i in idx for s in _halves(examples[i]))
            drift = None
            if rehearsal is not None:
                rows = rehearsal_batch(len(rehearsal.seqs), step, cfg, d)
                with autocast(d.device, cfg):
                    drift = rehearsal_penalty(model, rehearsal, rows, cfg, d, pad_id)
                (cfg.rehearsal * drift).backward()
            if not d.fsdp:  # FSDP2 averaged the gradients as it reduce-scattered them
                all_reduce_mean_([p.grad for p in params if p.grad is not None], d)
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            all_reduce_sum_(stats, d)
            last = _metrics(stats) | {"lr": lr, "grad_norm": float(grad_norm)}
            if drift is not None:  # this process's rehearsal answers: (log pi - log pi_ref)^2
                last["rehearsal_drift"] = float(drift.detach())
            if d.main:
                log(
                    log_path,
                    {"split": "train", "step": step, "total": total, "epoch": epoch, **last},
                )
                bar.update()
                bar.set_postfix(loss=f"{last['loss']:.4f}", margin=f"{last['margin']:.3f}")
                if on_progress is not None:
                    on_progress(step, total, last)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                save_checkpoint(checkpoint, step, model, optimizer, ref, cfg, data_sha256, d)
            barrier(d)  # nobody runs ahead of a checkpoint being written
        if heldout:
            eval_metrics = evaluate(model, heldout, ref[heldout_idx], cfg, d, pad_id, lambdas)
            if d.main:
                log(log_path, {"split": "eval", "step": step, "epoch": epoch + 1, **eval_metrics})
    bar.close()
    seconds_loop = time.perf_counter() - t_loop
    model.eval()

    # 5. Save: adapter, manifest, then one rename.
    summary = {
        "steps": step,
        "train": last,
        "eval": last_eval(log_path) if d.main else {},
        "examples": {"train": len(train_idx), "heldout": len(heldout_idx), "dropped": dropped},
        "tokens_per_second": tokens_seen / max(seconds_loop, 1e-9),
        "seconds": {
            "reference": seconds_reference,
            "train": seconds_loop,  # includes the held-out evaluations
            "total": time.perf_counter() - t_start,
        },
    }
    result_path, lora = None, full_trainable_state(model)  # gathered on every process
    if d.main:
        checkpoint.unlink(missing_ok=True)
        rehearsal_path.unlink(missing_ok=True)
        result_path = save_adapter(model, lora, work, out, {
            "base_model": str(base),
            "parent": str(init_adapter) if init_adapter is not None else None,
            "config": asdict(cfg),
            "data": {"path": str(pairs), "sha256": data_sha256, "kind": kind, **counts},
            "metrics": summary,
            "world_size": d.world,
        })  # fmt: skip
    barrier(d)
    return TrainResult(result_path, summary, model)


def _micro_batches(
    mine: list[int], step_batches: list[list[int]], cfg: TrainConfig, d: Dist
) -> list[tuple[list[int], float]]:
    """This process's micro-batches of one step, each with 1.0 (counted) or 0.0. Under FSDP2
    every process must run as many forward/backward passes as the others: one whose batch is
    shorter repeats its last micro-batch with weight 0 (a batch is never empty)."""
    size = cfg.micro_batch_size
    parts = [(mine[s : s + size], 1.0) for s in range(0, len(mine), size)]
    if d.fsdp:
        most = max(math.ceil(len(b) / size) for b in step_batches)
        parts += [(parts[-1][0], 0.0)] * (most - len(parts))
    return parts


def _counts(examples: Sequence[Example]) -> dict[str, Any]:
    """What the run trains on: pairs, and unpaired rows by label."""
    single = [e for e in examples if not isinstance(e, PairExample)]
    ups = sum(e.label for e in single)
    return {"pairs": len(examples) - len(single), "desirable": ups,
            "undesirable": len(single) - ups}  # fmt: skip


# --- command line -----------------------------------------------------------------------------


CHOICES = {
    "loss": losses.LOSS_NAMES,
    "rpo_span": ("chosen", "diverged"),
    "base_dtype": tuple(BASE_DTYPES),
    "quantize": QUANTIZE,
    "distributed": DISTRIBUTED,
}


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per TrainConfig field, so the CLI can never drift from the config."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in CHOICES:
            parser.add_argument(flag, choices=CHOICES[f.name], default=f.default)
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, nargs="+", default=list(f.default))
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a LoRA adapter on preference and/or KTO rows")
    p.add_argument(
        "--pairs", type=Path, required=True,
        help="TRL-style JSONL: preference rows, unpaired (KTO) rows, or both",
    )  # fmt: skip
    p.add_argument("--base", type=Path, required=True, help="base model directory")
    p.add_argument("--out", type=Path, required=True, help="adapter directory to create")
    p.add_argument("--init-adapter", type=Path, help="warm-start from (and refer to) this adapter")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--rehearsal-prompts", type=Path,
        help='JSONL {"prompt": ...} rows rehearsed with --rehearsal W (default: the shipped set)',
    )  # fmt: skip
    _config_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["lora_targets"] = tuple(values["lora_targets"])
    try:
        cfg = TrainConfig(**values)
    except AssertionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(
            cfg,
            pairs=args.pairs,
            base=args.base,
            out=args.out,
            init_adapter=args.init_adapter,
            resume=args.resume,
            progress_bar=not args.no_progress,
            rehearsal_prompts=args.rehearsal_prompts,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():  # started by train() under torchrun
            dist.destroy_process_group()
    if result.out is not None:
        print(json.dumps({"out": str(result.out), **result.metrics}))
    return 0
