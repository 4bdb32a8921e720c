"""Preference losses: one pure function per variant.

Every paired loss takes the summed log-probabilities of the chosen and rejected completions under
the policy and the reference, plus keyword hyper-parameters, and returns

    (per-example losses, chosen rewards, rejected rewards)

with the rewards detached (they are for logging). Callers reduce (mean, weighted mean, sum over a
gradient-accumulation window), so a loss function never decides how examples are weighted.

Notation used in the docstrings, for example ``i``::

    h_i = (pi_c - ref_c) - (pi_r - ref_r)     # difference of log-ratios, "logits" in TRL
    sigma(z) = 1 / (1 + exp(-z)),   -log sigma(z) = softplus(-z)

Rewards are the DPO implicit rewards ``beta * (pi - ref)`` for every variant, so the logged
margins and accuracies are comparable across losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return chosen, rejected


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Sigmoid DPO, Rafailov et al. 2023 (arXiv:2305.18290), Eq. 7:

        L = -log sigma(beta * h)

    Worked example, beta = 0.5: pi_c=-1, pi_r=-3, ref_c=-2, ref_r=-2 gives h = 1 - (-1) = 2,
    L = -log sigma(1) = log(1 + e^-1) = 0.31326169; rewards 0.5 and -0.5.
    Policy == reference gives h = 0 and L = log 2.
    """
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
    )
    h = (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps
    )
    return -F.logsigmoid(beta * h), chosen_rewards, rejected_rewards


def cdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float,
) -> LossOutput:
    """Conservative DPO: DPO with label smoothing eps, the probability that a label is flipped
    (Mitchell 2023, "A note on DPO with noisy preferences"; the form TRL's CPO/TPO use):

        L = -(1 - eps) log sigma(beta * h) - eps log sigma(-beta * h)

    Unlike plain DPO its minimum is at a finite margin, beta * h = log((1 - eps) / eps), so it
    stops pushing pairs apart once they are separated enough.

    Worked example, beta = 0.5, eps = 0.1, h = 2 (as in ``dpo_loss``):
    L = 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.9 * 0.31326169 + 0.1 * 1.31326169
      = 0.41326169. With h = 0, L = log 2 for any eps.
    """
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
    )
    h = (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps
    )
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
        -beta * h
    )
    return losses, chosen_rewards, rejected_rewards


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float,
) -> LossOutput:
    """Robust DPO (rDPO), Chowdhury, Kini & Natarajan 2024 (arXiv:2403.00409), Sec. 3: the
    de-biased loss for preferences flipped with known rate eps in [0, 0.5), for noisy user labels:

        L = [(1 - eps) * -log sigma(beta * h) - eps * -log sigma(-beta * h)] / (1 - 2 eps)

    Its expectation over the label noise equals the clean DPO loss. Note the minus between the
    two terms (cDPO adds them), so single examples can have negative loss.

    Worked example, beta = 0.5, eps = 0.1, h = 2:
    L = (0.9 * 0.31326169 - 0.1 * 1.31326169) / 0.8 = 0.15060935 / 0.8 = 0.18826169.
    With h = 0, L = (1 - 2 eps) log 2 / (1 - 2 eps) = log 2.
    """
    assert 0.0 <= label_smoothing < 0.5, f"robust DPO needs 0 <= eps < 0.5, got {label_smoothing}"
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
    )
    h = (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps
    )
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * h)
    flipped = -label_smoothing * F.logsigmoid(-beta * h)
    return (clean - flipped) / (1 - 2 * label_smoothing), chosen_rewards, rejected_rewards


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """IPO, Azar et al. 2023 (arXiv:2310.12036), Eq. 17, with beta in the role of tau:

        L = (h - 1 / (2 beta))^2

    A squared loss that regresses the log-ratio gap to a finite target instead of pushing it to
    infinity, so it does not overfit deterministic preferences the way DPO can.

    Pass log-probs *averaged* over completion tokens (``LENGTH_NORMALIZED`` says so to callers):
    with summed log-probs the target 1/(2 beta) would mean different things for short and long
    answers. TRL does the same, confirmed with the IPO authors.

    Worked example, beta = 0.5, h = 2: L = (2 - 1)^2 = 1. With h = 0, L = 1 / (4 beta^2) = 1.
    """
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
    )
    h = (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps
    )
    return (h - 1 / (2 * beta)) ** 2, chosen_rewards, rejected_rewards


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Hinge loss of SLiC-HF, Zhao et al. 2023 (arXiv:2305.10425): its rank-calibration term
    ``max(0, delta - log P(y+|x) + log P(y-|x))`` with delta = 1/beta, written on reference
    log-ratios as in RSO (Liu et al. 2023, arXiv:2309.06657) and TRL:

        L = max(0, 1 - beta * h)

    Worked example, beta = 0.5: h = 2 gives L = max(0, 1 - 1) = 0; h = 1 gives 0.5; h = 0 gives 1.
    """
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
    )
    h = (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps
    )
    return torch.relu(1 - beta * h), chosen_rewards, rejected_rewards


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO, Ethayarajh et al. 2024 (arXiv:2402.01306), Eq. 7 (lambda_y - v(x, y)), for unpaired
    thumbs up/down. With r = pi - ref and the reference point z0 = ``kl``:

        desirable (label True):    L = lambda_D * (1 - sigma(beta * (r - z0)))
        undesirable (label False): L = lambda_U * (1 - sigma(beta * (z0 - r)))

    ``kl`` is the batch estimate of KL(pi || ref): the mean of pi - ref over completions paired
    with *other* prompts (Sec. 4.1). The caller computes it, since it needs extra forwards;
    here it is detached and clamped at 0 as in the paper.

    Returns losses in the input order, and rewards beta * r split as (rewards of the desirable
    rows, rewards of the undesirable rows), so logging reads like the paired losses.

    Worked example, beta = 0.5, z0 = 0: r = 2 desirable gives 1 - sigma(1) = 0.26894142;
    r = 2 undesirable gives 1 - sigma(-1) = 0.73105858. With r = z0 every loss is lambda / 2.
    """
    labels = labels.bool()
    r = policy_logps - reference_logps
    z0 = kl.detach().clamp(min=0)
    losses = torch.where(
        labels,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    rewards = beta * r.detach()
    return losses, rewards[labels], rewards[~labels]


PairedLoss = Callable[..., LossOutput]

# Name -> function, for the CLI's --loss. "kto" is separate: it takes unpaired rows.
PAIRED_LOSSES: dict[str, PairedLoss] = {
    "dpo": dpo_loss,
    "cdpo": cdpo_loss,
    "robust": robust_dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
}
# Losses whose hyper-parameters include the label-flip rate eps.
USES_LABEL_SMOOTHING = frozenset({"cdpo", "robust"})
# Losses that expect per-token average log-probs instead of sums.
LENGTH_NORMALIZED = frozenset({"ipo"})
LOSS_NAMES = (*PAIRED_LOSSES, "kto")
