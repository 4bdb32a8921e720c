"""Log-probs of completion tokens, computed without ever holding full-vocabulary logits.

Shared by the DPO recipe (`trainer.dpo`: policy and reference passes) and the evaluation
(`trainer.evaluate`: preference accuracy on held-out pairs).
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.data import Batch, Tokens, collate
from trainer.distributed import full_tensor


class _SelectedLogProbs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T)[target]`` row by row, one chunk of rows at a time.

    The gradient with respect to ``hidden``, ``(onehot - softmax) @ weight`` per row, is worked
    out in the same pass, while the chunk's logits exist anyway; backward only scales it. So no
    logits are kept for backward and none are recomputed. The head weight must be frozen (LoRA
    leaves it alone); its gradient would need the upstream gradient, unknown at forward time.
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        w = weight.float()  # fp32 logits even under bf16 autocast: log-probs are summed
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                logits = hidden[rows].float() @ w.T
                lse = logits.logsumexp(-1)
                tgt = targets[rows]
                out[rows] = logits.gather(1, tgt[:, None]).squeeze(1) - lse
                if grad is not None:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax in the logits' memory
                    probs[torch.arange(len(tgt), device=tgt.device), tgt] -= 1.0
                    grad[rows] = (probs @ w).neg_().to(hidden.dtype)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None].to(grad.dtype), None, None, None


def _causal_lm(model: torch.nn.Module) -> Any:
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def completion_logps(
    model: torch.nn.Module, batch: Batch, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: summed log-probs of the completion tokens, and how many there are."""
    return per_sequence(batch, token_logps(model, batch, chunk))


def per_sequence(
    batch: Batch, values: torch.Tensor, where: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of per-token ``values`` (only ``where`` it is True) and the count."""
    seqs = batch.score_seqs if where is None else batch.score_seqs[where]
    values = values if where is None else values[where]
    counts = torch.zeros(batch.n_seqs, dtype=torch.long, device=values.device)
    counts.index_add_(0, seqs, torch.ones_like(seqs))
    sums = torch.zeros(batch.n_seqs, dtype=torch.float32, device=values.device)
    return sums.index_add(0, seqs, values), counts


def token_logps(model: torch.nn.Module, batch: Batch, chunk: int = 1024) -> torch.Tensor:
    """The log-prob of every completion token, in the batch's scoring order.

    Runs the model body, keeps the hidden states at positions that predict a completion token,
    and applies the LM head only there. Assumes logits = lm_head(hidden), true for Llama, Qwen,
    Mistral and SmolLM (``check_logits_path`` verifies it for a given model).
    """
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    assert getattr(head, "bias", None) is None, "LM heads with a bias are not supported"
    assert not head.weight.requires_grad, "the LM head must be frozen (see _SelectedLogProbs)"
    hidden = lm.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    weight = full_tensor(head.weight)  # FSDP2 shards the head: whole for this pass only
    return _SelectedLogProbs.apply(
        hidden[batch.score_rows, batch.score_cols], weight, batch.score_targets, chunk
    )


@torch.no_grad()
def check_logits_path(model: torch.nn.Module, device: torch.device) -> None:
    """Refuse models whose logits are not plain ``lm_head(hidden)`` (soft-capping, scaling):
    compare our path with the model's own forward on a few tokens."""
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]], device=device)
    ours, _ = completion_logps(model, collate([Tokens((1, 2, 3, 4, 5, 6), 1)], 0).to(device))
    logits = model(input_ids=ids, use_cache=False).logits.float()
    theirs = logits[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None]).sum()
    gap = (ours.sum() - theirs).abs().item()
    assert gap < 1e-2, f"{type(_causal_lm(model)).__name__}: logits path differs by {gap}"
