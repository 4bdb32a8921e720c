"""The policy: a frozen base model with a trainable LoRA, in one of three precisions.

``base_dtype`` fp32: the base in fp32 (on GPU, bf16 compute through autocast). bf16: the base
loaded straight into bf16, no fp32 copy on the way (2 bytes per frozen weight). ``quantize`` nf4
(QLoRA, Dettmers et al. 2023): the decoder's linear weights stored as 4-bit NormalFloat with
torchao (``NF4Tensor``: blocks of 64 weights, double-quantized scales, about 0.52 bytes per
weight), dequantized to the compute dtype one layer at a time. Embeddings, norms and the LM head
stay in ``base_dtype``. In every mode LoRA weights, their gradients and the optimizer state are
fp32, and the saved adapter is the same fp32 PEFT file.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from trainer.config import BASE_DTYPES, TrainConfig
from trainer.fused import fuse_for_training

NF4_BLOCK = 64  # weights per absmax scale (the QLoRA paper's block size)
NF4_SCALER_BLOCK = 256  # scales per second-level (double-quantization) block


def load_policy(
    base: Path, init_adapter: Path | None, cfg: TrainConfig, device: torch.device, *,
    place: bool = True,
) -> torch.nn.Module:  # fmt: skip
    """The base model in ``cfg.base_dtype`` (NF4 linears with ``cfg.quantize``) with a trainable
    fp32 LoRA: fresh from ``cfg``, or the parent adapter's weights and LoRA shape, on ``device``.
    ``place`` False leaves the unquantized weights on the CPU: FSDP2 moves each shard there."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    # Built on the CPU, moved at the end: an NF4 base is quantized layer by layer on the device
    # first, so the bf16 model never has to fit there (70B: 141 GB in bf16, 40 GB in NF4).
    model = AutoModelForCausalLM.from_pretrained(base, dtype=BASE_DTYPES[cfg.base_dtype])
    model.config.use_cache = False
    torch.manual_seed(cfg.seed)  # LoRA's A matrices: same seed, same start on every rank
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    else:
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    for _, p in trainable(model):  # master weights and AdamW state in fp32 whatever the base
        p.data = p.data.float()
    if cfg.fused:
        fuse_for_training(model)
    if cfg.quantize == "nf4":
        quantize_nf4_(model, device)
    if place:
        model.to(device)
    if device.type == "cuda" and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@torch.no_grad()
def quantize_nf4_(model: torch.nn.Module, device: torch.device) -> None:
    """Replace every frozen ``nn.Linear`` weight of the decoder (LoRA's base layers and the
    rest) by an NF4 tensor, quantized on ``device`` one weight at a time (a GPU does it in
    seconds; the full-precision model never has to fit there)."""
    try:
        from torchao.quantization import to_nf4
    except ImportError as exc:
        raise RuntimeError(
            "--quantize nf4 needs torchao: pip install 'prefloop[qlora]' (or torchao>=0.18)"
        ) from exc

    decoder = model.get_base_model().get_decoder()
    for module in decoder.modules():
        if type(module) is not torch.nn.Linear or module.weight.requires_grad:
            continue  # LoRA's own A and B are trainable Linears: they stay fp32
        weight = module.weight.detach().to(device)
        assert weight.numel() % NF4_BLOCK == 0, f"NF4 needs multiples of {NF4_BLOCK} weights"
        # Real models' shapes give whole second-level blocks of 256 scales and plenty of them;
        # a small model gets smaller blocks, at least 8 of them, so that FSDP2 can still split
        # them across up to 8 processes (a few bytes more).
        scalers = math.gcd(NF4_SCALER_BLOCK, weight.numel() // NF4_BLOCK // 8)
        nf4 = to_nf4(weight, NF4_BLOCK, scalers)
        module.weight = torch.nn.Parameter(nf4, requires_grad=False)


def autocast(device: torch.device, cfg: TrainConfig) -> Any:
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
