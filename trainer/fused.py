"""Fused training kernels for a Llama-family decoder with LoRA: less memory per step, same math.

A LoRA DPO step keeps, per token and layer, every tensor autograd saves for the backward, and
it allocates many short-lived ones on the way (PEFT's LoRA layer alone makes four outputs per
projection: base, LoRA, scaled LoRA, sum). On a CPU that second kind costs as much as the first:
glibc's heap keeps the holes they leave, so the resident size grows with them. These functions
keep what the backward needs and nothing else, with hand-written backwards (checked against
autograd in tests/trainer/test_fused.py):

* ``LoraLinear``: ``x W^T + s (x A^T) B^T`` in one output; saves ``x`` and ``x A^T`` (r wide).
* ``LoraSwiGLU``: ``down(silu(g) * u)`` with a LoRA ``down``; saves ``g`` and ``u`` and
  recomputes the product in the backward (elementwise), instead of keeping ``silu(g)`` and the
  product as well (as Unsloth's fused LoRA MLP does).
* ``RMSNorm``: saves its input and one scale per token; the stock norm makes two temporaries of
  the input's size on the way.
* ``Rotary``: the rotary embedding written into one output; the stock form makes three more
  temporaries of the input's size.
* ``grouped_sdpa``: attention with grouped-query K/V passed as they are (``enable_gqa``), on the
  CPU, where the flash kernel takes a mask; the stock path repeats K and V per query head and
  saves the copies.

``fuse_for_training(model)`` swaps them into eligible modules, for every pass: the policy's,
the reference's (the adapter disabled is LoRA scaled by 0 through the same kernels, so a fresh
adapter reproduces the reference bit for bit) and the run's held-out evaluation. (The gate's
evaluation, ``trainer.evaluate``, loads its own model with the stock layers.) A module keeps
the stock path when it has anything these do not handle: LoRA dropout or DoRA, several
adapters, a bias, a quantized (NF4) weight, a trainable base weight. Under FSDP2 the kernels
see the gathered weights, as the stock layers do.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION = "prefloop_sdpa"  # the name grouped_sdpa is registered under with transformers


def _dtypes(x: torch.Tensor, lora_a: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype of the base matmul, dtype of the LoRA path), as PEFT gets them: under
    autocast both are the autocast dtype; otherwise the input's, and LoRA's own (fp32)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return dtype, dtype
    return x.dtype, lora_a.dtype


def _lora_forward(
    x: Tensor, w: Tensor, a: Tensor, b: Tensor, s: float, cd: torch.dtype, ld: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``x W^T + s (x A^T) B^T`` and ``x A^T``, in one output buffer."""
    y = x.to(cd) @ w.to(cd).T
    ax = x.to(ld) @ a.to(ld).T
    if y.dtype == ax.dtype:
        y.view(-1, y.shape[-1]).addmm_(ax.view(-1, ax.shape[-1]), b.to(ld).T, alpha=s)
    else:  # bf16 base, fp32 LoRA: summed in fp32, stored in the base's dtype (as PEFT does)
        y.add_(ax @ b.to(ld).T, alpha=s)
    return y, ax


def _lora_backward(
    gy: Tensor, x: Tensor, ax: Tensor, w: Tensor, a: Tensor, b: Tensor, s: float,
    cd: torch.dtype, ld: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of ``_lora_forward`` with respect to ``x``, ``A`` and ``B``."""
    gy2 = gy.reshape(-1, gy.shape[-1])
    gy_l = gy2.to(ld)
    gb = (gy_l.T @ ax.reshape(-1, ax.shape[-1])).mul_(s)
    gax = (gy_l @ b.to(ld)).mul_(s)
    ga = gax.T @ x.reshape(-1, x.shape[-1]).to(ld)
    gx = gy2.to(cd) @ w.to(cd)
    if gx.dtype == gax.dtype:
        gx.addmm_(gax, a.to(ld))
    else:
        gx.add_(gax @ a.to(ld))
    return gx.view(*x.shape[:-1], -1).to(x.dtype), ga.to(a.dtype), gb.to(b.dtype)


class LoraLinear(torch.autograd.Function):
    """A frozen linear plus its LoRA: ``x W^T + s (x A^T) B^T``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, a: Tensor, b: Tensor, s: float) -> Tensor:
        cd, ld = _dtypes(x, a)
        with torch.autocast(x.device.type, enabled=False):
            y, ax = _lora_forward(x, w, a, b, s, cd, ld)
        ctx.save_for_backward(x, w, a, b, ax)
        ctx.s, ctx.cd, ctx.ld = s, cd, ld
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, a, b, ax = ctx.saved_tensors
        gx, ga, gb = _lora_backward(gy, x, ax, w, a, b, ctx.s, ctx.cd, ctx.ld)
        return gx, None, ga, gb, None


class LoraSwiGLU(torch.autograd.Function):
    """``down(silu(g) * u)`` with ``down`` a frozen linear plus LoRA; the product is recomputed
    in the backward instead of saved."""

    @staticmethod
    def forward(
        ctx: Any, g: Tensor, u: Tensor, w: Tensor, a: Tensor, b: Tensor, s: float
    ) -> Tensor:
        cd, ld = _dtypes(g, a)
        with torch.autocast(g.device.type, enabled=False):
            p = F.silu(g).mul_(u)
            y, ax = _lora_forward(p, w, a, b, s, cd, ld)
        ctx.save_for_backward(g, u, w, a, b, ax)
        ctx.s, ctx.cd, ctx.ld = s, cd, ld
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g, u, w, a, b, ax = ctx.saved_tensors
        sig = torch.sigmoid(g)
        silu = g * sig
        gp, ga, gb = _lora_backward(gy, silu * u, ax, w, a, b, ctx.s, ctx.cd, ctx.ld)
        gu = gp * silu
        del silu
        # d silu(g) / dg = sig * (1 + g * (1 - sig))
        gg = gp.mul_(u).mul_(sig.mul_(g * (1 - sig) + 1))
        return gg, gu, None, ga, gb, None


class RMSNorm(torch.autograd.Function):
    """Llama's RMSNorm with a frozen weight: ``w * (x / rms(x))``, computed in fp32, output in
    the input's dtype times the weight (transformers' ``LlamaRMSNorm``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, eps: float) -> Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 in gradcheck
        with torch.autocast(x.device.type, enabled=False):
            # The mean square through a norm: no x-sized temporary besides the output.
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
            rstd = norm.pow_(2).div_(x.shape[-1]).add_(eps).rsqrt_()
            y = (x * rstd).to(x.dtype)
            y = y.mul_(w) if y.dtype == torch.promote_types(w.dtype, y.dtype) else w * y
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, rstd = ctx.saved_tensors
        gn = (gy * w).to(rstd.dtype)  # gradient of the normalised input
        xhat = x.to(rstd.dtype) * rstd
        gx = gn.sub_(xhat.mul_((gn * xhat).mean(-1, keepdim=True))).mul_(rstd)
        return gx.to(x.dtype), None, None


class Rotary(torch.autograd.Function):
    """Rotary position embedding, ``q cos + rotate_half(q) sin``, written into one output (the
    stock form makes three more temporaries of q's size); nothing saved but ``cos`` and
    ``sin``."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        h = q.shape[-1] // 2
        out = q * cos
        # Multiply, then add: a fused multiply-add rounds once where the stock form rounds
        # twice, and only in the vectorised part of a row, so results would depend on where a
        # token sits in the batch (policy and reference batch differently).
        out[..., :h].sub_(q[..., h:] * sin[..., :h])
        out[..., h:].add_(q[..., :h] * sin[..., h:])
        ctx.save_for_backward(cos, sin)
        ctx.dtype = q.dtype
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        h = g.shape[-1] // 2
        gq = g * cos
        gq[..., :h].add_(g[..., h:] * sin[..., h:])
        gq[..., h:].sub_(g[..., :h] * sin[..., :h])
        return gq.to(ctx.dtype), None, None


def _fused_rotary(stock: Any) -> Any:
    """``apply_rotary_pos_emb`` of a transformers modeling module, through ``Rotary``."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN001
        if args or set(kwargs) - {"unsqueeze_dim"}:
            return stock(q, k, cos, sin, *args, **kwargs)
        dim = kwargs.get("unsqueeze_dim", 1)
        cos, sin = cos.unsqueeze(dim), sin.unsqueeze(dim)
        return Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)

    apply_rotary_pos_emb.stock = stock
    return apply_rotary_pos_emb


def _patch_rotary(attention: torch.nn.Module) -> bool:
    """Route the attention's modeling module through ``_fused_rotary``, if its
    ``apply_rotary_pos_emb`` is Llama's rotate-half form: checked on random numbers, since a
    family with a partial or interleaved rotary keeps the name for other arithmetic."""
    module = sys.modules[type(attention).__module__]
    stock = getattr(module, "apply_rotary_pos_emb", None)
    if stock is None or hasattr(stock, "stock"):
        return stock is not None
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, 8, generator=gen), torch.randn(1, 1, 3, 8, generator=gen)
    cos, sin = torch.randn(1, 3, 8, generator=gen), torch.randn(1, 3, 8, generator=gen)
    fused = _fused_rotary(stock)
    try:
        pairs = zip(stock(q, k, cos, sin), fused(q, k, cos, sin), strict=True)
        same = all(torch.allclose(a, b) for a, b in pairs)
    except (TypeError, RuntimeError, ValueError):  # another signature: leave it alone
        return False
    if same:
        module.apply_rotary_pos_emb = fused
    return same


def _plain(weight: torch.Tensor) -> bool:
    """A dense, frozen weight: not NF4, not an FSDP2 shard."""
    return type(weight.data) is torch.Tensor and not weight.requires_grad


def _lora_ready(layer: Any) -> bool:
    """A PEFT LoRA linear this module's kernels compute exactly: one active adapter, unmerged,
    no dropout, no DoRA or LoRA bias, a plain bias-free base linear. (A disabled adapter is
    computed too, scaled by 0: ``_lora_args``.)"""
    if layer.merged or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    base = layer.base_layer
    return (
        type(base) is torch.nn.Linear
        and base.bias is None
        and _plain(base.weight)
        and name in layer.lora_A
        and isinstance(layer.lora_dropout[name], torch.nn.Identity)
        and not layer.use_dora.get(name, False)
        and getattr(layer.lora_A[name], "bias", None) is None
        and getattr(layer.lora_B[name], "bias", None) is None
    )


def _lora_args(layer: Any) -> tuple[Any, ...]:
    """The kernel's weights; a disabled adapter (the reference) is LoRA scaled by 0, so that
    policy and reference run the same kernels and a fresh LoRA (B = 0) gives the reference's
    log-probs bit for bit, in bf16 as in fp32."""
    name = layer.active_adapters[0]
    w_a, w_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    scaling = 0.0 if layer.disable_adapters else layer.scaling[name]
    return layer.base_layer.weight, w_a, w_b, scaling


def _lora_linear_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs or not _lora_ready(self):
        return self._stock_forward(x, *args, **kwargs)
    return LoraLinear.apply(x, *_lora_args(self))


def _swiglu_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not _lora_ready(self.down_proj):
        return self._stock_forward(x)
    return LoraSwiGLU.apply(self.gate_proj(x), self.up_proj(x), *_lora_args(self.down_proj))


def _rmsnorm_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not _plain(self.weight):
        return self._stock_forward(x)
    return RMSNorm.apply(x, self.weight, self.variance_epsilon)


def grouped_sdpa(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers' SDPA attention, but on the CPU grouped K/V heads go in as they are.

    Elsewhere (CUDA with a mask has no grouped kernel but the slow math one), and for anything
    beyond plain attention (sliding windows, soft-capping, position bias), the stock function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = set(kwargs) <= {"dropout", "scaling", "is_causal", "position_ids"}
    if query.device.type != "cpu" or not plain or key.shape[1] == query.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    out = F.scaled_dot_product_attention(
        query, key, value,
        attn_mask=attention_mask,
        dropout_p=kwargs.get("dropout", 0.0),
        scale=kwargs.get("scaling"),
        is_causal=bool(causal and attention_mask is None and query.shape[2] > 1),
        enable_gqa=True,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def _patch(module: torch.nn.Module, forward: Any) -> None:
    module._stock_forward = module.forward
    module.forward = types.MethodType(forward, module)


def _is_swiglu(module: torch.nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (
        all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and type(act).__name__ in ("SiLU", "SiLUActivation")
        and hasattr(module.down_proj, "lora_A")
    )


def _is_llama_rmsnorm(module: torch.nn.Module) -> bool:
    """Llama's form, ``weight * x / rms(x)`` (Gemma's ``(1 + weight)`` form has ``eps``)."""
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def fuse_for_training(model: torch.nn.Module) -> dict[str, int]:
    """Swap the fused kernels into ``model`` (a PEFT LoRA model) in place; how many of each."""
    from peft.tuners.lora import Linear as LoraLayer
    from transformers import AttentionInterface

    counts = {"lora": 0, "swiglu": 0, "rmsnorm": 0, "attention": 0, "rotary": 0}
    for module in model.modules():
        if hasattr(module, "_stock_forward"):
            continue  # fused already
        if isinstance(module, LoraLayer):
            _patch(module, _lora_linear_forward)
            counts["lora"] += 1
        elif _is_swiglu(module):
            _patch(module, _swiglu_forward)
            counts["swiglu"] += 1
        elif _is_llama_rmsnorm(module):
            _patch(module, _rmsnorm_forward)
            counts["rmsnorm"] += 1
        elif type(module).__name__.endswith("Attention") and hasattr(module, "q_proj"):
            counts["rotary"] += _patch_rotary(module)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation == "sdpa":
        AttentionInterface.register(ATTENTION, grouped_sdpa)
        base.set_attn_implementation(ATTENTION)
        counts["attention"] = 1
    return counts
