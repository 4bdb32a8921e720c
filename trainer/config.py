"""The one config of a training run: a frozen dataclass, one CLI flag per field
(`trainer.dpo.build_parser`), saved into every adapter manifest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer import losses
from trainer.distributed import DISTRIBUTED

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUANTIZE = ("none", "nf4")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the result of a run; saved into every adapter manifest."""

    loss: str = "dpo"  # one of trainer.losses.LOSS_NAMES
    beta: float = 0.1
    label_smoothing: float = 0.1  # label-flip rate eps, used by cdpo and robust only
    rpo_alpha: float = 0.0  # weight of the NLL on chosen answers (RPO, Pang et al. 2024)
    rpo_span: str = "chosen"  # "chosen": the whole answer; "diverged": where it parts from rejected
    # Weight of a penalty on moving the log-probs of the tokens a pair's answers share (the
    # model's own text an operator kept and added to): per token (log pi - log pi_ref)^2,
    # averaged over the answer. It pins what the edit did not touch, so the update goes where
    # the edit did.
    anchor: float = 0.0
    # Rehearsal, against forgetting what the pairs never mention: the reference's own greedy
    # answers (``rehearsal_tokens`` long) to unrelated prompts (``train(rehearsal_prompts=...)``,
    # by default trainer/rehearsal.jsonl) keep their log-probs. The penalty is ``rehearsal``
    # times per-token (log pi - log pi_ref)^2 averaged over each answer, on ``rehearsal_batch``
    # answers per optimizer step. Every update that moved SmolLM2's style also cost terse
    # factual answers ("What does NASA stand for?"), which no pair was about.
    rehearsal: float = 0.0
    rehearsal_batch: int = 4
    rehearsal_tokens: int = 48
    # Unpaired rows (lone thumbs) train with KTO, beside the pairs' ``loss`` in one run.
    desirable_weight: float = 1.0  # KTO lambda_D
    undesirable_weight: float = 1.0  # KTO lambda_U
    # Rescale lambda_D / lambda_U so that lambda_D n_D / (lambda_U n_U) lies in [1, 4/3], the
    # KTO paper's advice for unbalanced ups and downs (Ethayarajh et al. 2024, Sec. 4.2).
    kto_balance: bool = True
    # lr 2e-4 for 1-3 epochs moved held-out greedy answers of SmolLM2-135M on ~80 on-policy
    # pairs; 5e-5 on off-policy pairs drove the loss to 0.02 and changed nothing.
    lr: float = 2e-4
    epochs: int = 2
    batch_size: int = 8  # pairs per optimizer step, per process
    # Pairs per forward/backward; gradients accumulate over the batch's micro-batches. Small
    # micro-batches cut activation memory, and on CPU they are faster too (SmolLM2, 2 cores:
    # 16 sequences in one forward+backward 8.4 s / 5.6 GB, in chunks of 4: 4.4 s / 2.4 GB).
    micro_batch_size: int = 2
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 1024  # prompt + completion tokens; longer completions are cut
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # 0 keeps "policy == reference" exact at step 0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    eval_fraction: float = 0.1  # held out when there are at least 10 rows
    seed: int = 0
    logits_chunk: int = 1024  # completion tokens per LM-head chunk
    checkpoint_every: int = 50  # optimizer steps; 0 disables checkpoints
    bf16: bool = True  # autocast, on GPU only
    gradient_checkpointing: bool = True  # on GPU only: on 2 CPU cores compute, not memory, binds
    fused: bool = True  # fused LoRA, SwiGLU, RMSNorm and grouped attention (trainer.fused)
    # Precision of the frozen base (trainer.model): fp32 | bf16, and nf4 (QLoRA) for the
    # decoder's linear weights. LoRA and its optimizer state are fp32 in every mode.
    base_dtype: str = "fp32"
    quantize: str = "none"
    # Under torchrun: ddp (every process holds the whole model, gradients averaged) or fsdp2
    # (each decoder layer, the rest and LoRA sharded across processes; trainer.distributed).
    distributed: str = "ddp"

    def __post_init__(self) -> None:
        assert self.loss in losses.LOSS_NAMES, f"loss must be one of {losses.LOSS_NAMES}"
        assert not (self.loss == "kto" and self.rpo_alpha), "rpo_alpha needs paired data"
        assert not (self.loss == "kto" and self.anchor), "anchor needs paired data"
        assert self.anchor >= 0, "anchor is a weight, >= 0"
        assert self.rehearsal >= 0, "rehearsal is a weight, >= 0"
        assert self.rehearsal_batch >= 1 and self.rehearsal_tokens >= 1
        assert self.rpo_span in ("chosen", "diverged"), "rpo_span must be chosen or diverged"
        assert self.batch_size >= 1 and self.micro_batch_size >= 1 and self.epochs >= 1
        assert self.base_dtype in BASE_DTYPES, f"base_dtype must be one of {tuple(BASE_DTYPES)}"
        assert self.quantize in QUANTIZE, f"quantize must be one of {QUANTIZE}"
        assert self.distributed in DISTRIBUTED, f"distributed must be one of {DISTRIBUTED}"
