"""Preference losses: hand-worked values, log 2 at policy == reference, and agreement with TRL.

TRL keeps its losses inside ``DPOTrainer._compute_loss`` / ``KTOTrainer._compute_loss``, so the
agreement tests call those methods on a stand-in ``self`` and a stand-in model whose per-token
log-probs are chosen by the test. That runs TRL's own loss code on our numbers without building a
trainer (which needs a model, a dataset and an accelerator).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from trainer import losses as L

PAIRED_NAMES = ["dpo", "cdpo", "robust", "ipo", "hinge"]


def _paired(name: str, pc, pr, rc, rr, *, beta: float, eps: float = 0.1):
    kwargs = {"beta": beta}
    if name in L.USES_LABEL_SMOOTHING:
        kwargs["label_smoothing"] = eps
    return L.PAIRED_LOSSES[name](pc, pr, rc, rr, **kwargs)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# --- hand-worked values (the docstrings show the arithmetic) ------------------------------------

# pi_c=-1, pi_r=-3, ref_c=-2, ref_r=-2 -> h = 2; beta = 0.5, eps = 0.1.
HAND = {
    "dpo": 0.31326169,  # log(1 + e^-1)
    "cdpo": 0.41326169,  # 0.9 log(1 + e^-1) + 0.1 log(1 + e)
    "robust": 0.18826169,  # (0.9 log(1 + e^-1) - 0.1 log(1 + e)) / 0.8
    "ipo": 1.0,  # (2 - 1/(2 * 0.5))^2
    "hinge": 0.0,  # max(0, 1 - 0.5 * 2)
}


@pytest.mark.parametrize("name", PAIRED_NAMES)
def test_hand_worked_values(name: str) -> None:
    losses, chosen, rejected = _paired(name, t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert_close(losses, t(HAND[name]), atol=1e-8, rtol=0)
    assert_close(chosen, t(0.5))
    assert_close(rejected, t(-0.5))


def test_hinge_is_linear_below_the_margin() -> None:
    losses, _, _ = L.hinge_loss(
        t(-1.0, -1.0), t(-2.0, -1.0), t(-1.0, -1.0), t(-1.0, -1.0), beta=0.5
    )
    assert_close(losses, t(0.5, 1.0))  # h = 1 -> 0.5, h = 0 -> 1


def test_kto_hand_worked_values() -> None:
    # r = 2 for both rows, z0 = 0, beta = 0.5: 1 - sigma(1) and 1 - sigma(-1).
    losses, chosen, rejected = L.kto_loss(
        t(-1.0, -1.0), t(-3.0, -3.0), torch.tensor([True, False]), t(0.0), beta=0.5
    )
    assert_close(losses, t(0.26894142, 0.73105858), atol=1e-8, rtol=0)
    assert_close(chosen, t(1.0))
    assert_close(rejected, t(1.0))
    # A negative KL estimate is clamped to 0, as in the paper.
    clamped, _, _ = L.kto_loss(
        t(-1.0, -1.0), t(-3.0, -3.0), torch.tensor([True, False]), t(-5.0), beta=0.5
    )
    assert_close(clamped, losses)


# --- policy == reference -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpo", "cdpo", "robust"])
def test_log2_when_policy_equals_reference(name: str) -> None:
    logps = torch.randn(16, dtype=torch.float64) * 20
    other = torch.randn(16, dtype=torch.float64) * 20
    losses, chosen, rejected = _paired(name, logps, other, logps, other, beta=0.1)
    assert_close(losses, torch.full_like(losses, math.log(2)))
    assert torch.all(chosen == 0) and torch.all(rejected == 0)


def test_ipo_and_hinge_at_policy_equals_reference() -> None:
    x = torch.randn(4, dtype=torch.float64)
    ipo, _, _ = L.ipo_loss(x, x, x, x, beta=0.25)
    assert_close(ipo, torch.full_like(x, 4.0))  # (1 / (2 * 0.25))^2
    hinge, _, _ = L.hinge_loss(x, x, x, x, beta=0.25)
    assert_close(hinge, torch.ones_like(x))


def test_kto_is_half_weight_when_policy_equals_reference() -> None:
    x = torch.randn(6, dtype=torch.float64)
    labels = torch.tensor([True, False, True, False, True, True])
    losses, _, _ = L.kto_loss(x, x, labels, t(0.0), beta=0.1, desirable_weight=1.5)
    assert_close(losses, torch.where(labels, 0.75, 0.5).double())


def test_rewards_are_detached_and_losses_have_gradients() -> None:
    pc = torch.randn(3, requires_grad=True)
    for name in PAIRED_NAMES:
        losses, chosen, rejected = _paired(
            name, pc, torch.randn(3), torch.randn(3), torch.randn(3), beta=0.1
        )
        assert losses.shape == (3,), "callers reduce, so losses are per example"
        assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad


# --- agreement with TRL ------------------------------------------------------------------------


class _FakeModel:
    """Stands in for a model patched with TRL's fused LM head: the per-token log-probs are the
    (float) label values themselves, 0 where the label is masked."""

    training = True

    def __call__(self, *, labels: torch.Tensor, **_: object) -> SimpleNamespace:
        shifted = labels[:, 1:]
        per_token = torch.where(shifted == -100, torch.zeros_like(shifted), shifted)
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(
            log_probs=per_token,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
            log_sum_sq_probs=zeros,
        )


def _fake_accelerator() -> SimpleNamespace:
    return SimpleNamespace(
        device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
    )


def _sequences(logps: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float "input ids" whose first completion token carries the whole sequence log-prob, and a
    completion mask with ``lengths[i]`` completion tokens after one prompt token."""
    width = int(lengths.max()) + 1
    ids = torch.zeros(len(logps), width, dtype=torch.float64)
    ids[:, 1] = logps
    positions = torch.arange(width)
    mask = ((positions >= 1) & (positions <= lengths[:, None])).long()
    return ids, mask


def _trl_dpo(loss_type: str, pc, pr, rc, rr, lc, lr, *, beta: float, eps: float) -> torch.Tensor:
    from trl import DPOTrainer

    fake_self = SimpleNamespace(
        model=_FakeModel(),
        accelerator=_fake_accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    ids, mask = _sequences(torch.cat([pc, pr]), torch.cat([lc, lr]))
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    return DPOTrainer._compute_loss(fake_self, fake_self.model, inputs, False)


TRL_NAMES = {"dpo": "sigmoid", "robust": "robust", "ipo": "ipo", "hinge": "hinge"}


@pytest.mark.parametrize("name", sorted(TRL_NAMES))
def test_agrees_with_trl_dpo_trainer(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    n, beta, eps = 8, 0.3, 0.2
    pc, pr, rc, rr = (-torch.rand(n, generator=gen, dtype=torch.float64) * 40 for _ in range(4))
    lc, lr = (torch.randint(1, 12, (n,), generator=gen) for _ in range(2))
    for i in range(n):  # example by example, so per-example losses are compared, not only means
        sl = slice(i, i + 1)
        expected = _trl_dpo(
            TRL_NAMES[name], pc[sl], pr[sl], rc[sl], rr[sl], lc[sl], lr[sl], beta=beta, eps=eps
        )
        args = (pc[sl], pr[sl], rc[sl], rr[sl])
        if name in L.LENGTH_NORMALIZED:  # IPO: our callers pass per-token averages
            args = (pc[sl] / lc[sl], pr[sl] / lr[sl], rc[sl] / lc[sl], rr[sl] / lr[sl])
        ours, _, _ = _paired(name, *args, beta=beta, eps=eps)
        assert_close(ours.mean(), expected.to(ours.dtype), atol=1e-6, rtol=0)


def test_cdpo_agrees_with_trl() -> None:
    """TRL's DPOTrainer no longer applies label smoothing to the sigmoid loss; its CPO trainer
    keeps the conservative form, on log-probs without a reference. Feeding it the log-ratios
    pi - ref gives exactly cDPO."""
    from trl.experimental.cpo import CPOTrainer

    gen = torch.Generator().manual_seed(1)
    n, beta, eps = 16, 0.3, 0.2
    pc, pr, rc, rr = (-torch.rand(n, generator=gen, dtype=torch.float64) * 40 for _ in range(4))
    fake_self = SimpleNamespace(
        alpha=0.0,
        loss_type="sigmoid",
        beta=beta,
        label_smoothing=eps,
        accelerator=_fake_accelerator(),
    )
    expected, exp_chosen, exp_rejected = CPOTrainer.cpo_loss(fake_self, pc - rc, pr - rr)
    ours, chosen, rejected = L.cdpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert_close(ours, expected, atol=1e-6, rtol=0)
    assert_close(chosen, exp_chosen)
    assert_close(rejected, exp_rejected)


def test_kto_agrees_with_trl() -> None:
    from trl import KTOTrainer

    gen = torch.Generator().manual_seed(2)
    n, beta = 10, 0.2
    policy, ref, policy_kl, ref_kl = (
        -torch.rand(n, generator=gen, dtype=torch.float64) * 30 for _ in range(4)
    )
    policy_kl = ref_kl + 0.5  # a positive KL estimate, so the reference point matters
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1])
    fake_self = SimpleNamespace(
        model=_FakeModel(),
        accelerator=_fake_accelerator(),
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=1.3,
        undesirable_weight=0.7,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    fake_self._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(
        fake_self, model, batch
    )
    lengths = torch.ones(n, dtype=torch.long)
    ids, mask = _sequences(policy, lengths)
    kl_ids, kl_mask = _sequences(policy_kl, lengths)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones_like(kl_mask),
        "KL_completion_mask": kl_mask,
        "label": labels,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    expected = KTOTrainer._compute_loss(fake_self, fake_self.model, inputs, False)
    kl = (policy_kl - ref_kl).mean()
    ours, _, _ = L.kto_loss(
        policy, ref, labels.bool(), kl, beta=beta, desirable_weight=1.3, undesirable_weight=0.7
    )
    assert_close(ours.mean(), expected, atol=1e-6, rtol=0)


def test_registry_names() -> None:
    assert set(L.LOSS_NAMES) == {"dpo", "cdpo", "robust", "ipo", "hinge", "kto"}
    assert L.USES_LABEL_SMOOTHING <= set(L.PAIRED_LOSSES)
    assert L.LENGTH_NORMALIZED <= set(L.PAIRED_LOSSES)
