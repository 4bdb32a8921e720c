"""Live canary: is the candidate adapter liked better than (or as well as) the incumbent?

Pure statistics over live signal counts; the service routes a share of a segment's traffic to
the candidate (`assign`), feeds the counts per arm to `decide` as often as it likes, and acts on
the answer. "stop" means no decision: the incumbent stays.

The outcome (`outcomes`): an answer with a thumbs up is a success; one with a thumbs down, or
whose prompt the user regenerated, is a failure; silent answers are not counted. Silence is
ambiguous (most people never rate), so counting it would dilute every difference towards zero
and make the rate depend on how often people rate rather than on what they think; a
regeneration is the one negative signal people give without rating. The rate is therefore the
share of positive signals among the signals given.

The test: a mixture sequential probability ratio test (mSPRT; Johari, Koomen, Pekelis and
Walsh, "Always valid inference", Operations Research 2022), for the difference
d = candidate rate - incumbent rate, with the normal approximation d_hat ~ N(d, V) and a normal
mixing distribution N(0, tau^2) over alternatives. For a hypothesised difference d0 the mixture
likelihood ratio is

    Lambda(d0) = sqrt(V / (V + tau^2)) * exp(tau^2 (d_hat - d0)^2 / (2 V (V + tau^2)))

a nonnegative martingale under d = d0, so by Ville's inequality P(ever Lambda >= 1/alpha) <=
alpha, however often it is looked at. Inverting it gives the always-valid (1 - alpha)
confidence sequence d_hat +- h with

    h = sqrt(V (V + tau^2) / tau^2 * (2 ln(1/alpha) + ln((V + tau^2) / V)))

that holds the true d at every look at once, with probability >= 1 - alpha.

The rule: promote when the interval's lower bound is above -margin (with margin 0: the
candidate is better); roll back when its upper bound is below 0 (worse); else continue, and stop
at max_outcomes or max_hours. If both hold (proven worse, but by less than the margin the
operator accepts) the candidate is promoted: that is what the margin says.

The alpha split: none. Every wrong decision needs the interval to miss the true d at the moment
of deciding (a promotion when d <= -margin has lower bound > -margin >= d; a rollback when
d >= 0 has upper bound < 0 <= d), and the interval misses d at some look with probability
<= alpha. So, with one two-sided (1 - alpha) sequence, P(false promotion) <= alpha when the
arms are equal (margin 0) and when the candidate is worse by exactly the margin, P(false
rollback) <= alpha when it is equal, and all wrong decisions together stay <= alpha. By the
symmetry of the normal each one-sided error is about alpha / 2 in practice: the price of a
bound that holds for both directions and any monitoring schedule.

Caveats stated, not hidden: the guarantee is as good as the normal approximation (hence
`min_outcomes`; rates near 0 or 1 use Laplace-smoothed rates in V so that V is never 0), and it
treats outcomes as independent. Several answers from the same person are not: pass each arm's
per-subject counts (`combine`) and V becomes cluster-robust (the delta-method variance of a
ratio estimator over end users, never below the binomial V).

Head-to-head picks (a "which is better?" turn answered once by each arm): the picked arm gets a
success (`won`) and the other a failure (`lost`). The two arms' rates are then no longer
independent (one pick moves both, in opposite directions), so V of the difference is
V_c + V_i - 2 Cov; `covariance` estimates Cov from the people counted in both arms, and with
picks alone V is about 4 p (1 - p) / n, twice what two independent arms would give. A positive
estimate is ignored (that only makes the interval wider, never wrongly narrow).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Clusters:
    """Sums over an arm's end users of their (successes s, trials n): what cluster-robust V
    needs, in O(1) space. `combine` builds it; the service may also sum it in SQL."""

    subjects: int  # end users with at least one outcome
    ss: int  # sum of s^2
    sn: int  # sum of s * n
    nn: int  # sum of n^2


@dataclass(frozen=True)
class ArmStats:
    """One arm's live signals since the experiment started."""

    answers: int  # answers served by this arm
    up: int  # thumbs up on them
    down: int  # thumbs down on them
    regenerated: int  # of them, answers whose prompt the user asked to regenerate
    clusters: Clusters | None = None  # optional, from `combine`: makes V cluster-robust
    won: int = 0  # head-to-head picks of this arm's answer over the other arm's
    lost: int = 0  # head-to-head picks of the other arm's answer over this arm's


@dataclass(frozen=True)
class CanaryPolicy:
    margin: float = 0.0  # promote when better, or worse by at most this (0: must be better)
    alpha: float = 0.05  # error rate, valid however often `decide` is called
    min_outcomes: int = 20  # per arm, before any decision (the normal approximation)
    max_outcomes: int = 5000  # per arm: stop (no decision) when both reach it
    max_hours: float = 168.0  # stop (no decision) after this long
    tau: float = 0.1  # sd of the mSPRT mixing normal: the difference the test is tuned for

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if self.tau <= 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if not 1 <= self.min_outcomes <= self.max_outcomes:
            raise ValueError("need 1 <= min_outcomes <= max_outcomes")
        if self.max_hours <= 0:
            raise ValueError(f"max_hours must be positive, got {self.max_hours}")


@dataclass(frozen=True)
class Decision:
    action: Literal["continue", "promote", "rollback", "stop"]
    reason: str  # one sentence an operator reads: rates, counts, the interval, the threshold
    candidate_rate: float
    incumbent_rate: float
    difference: float  # candidate - incumbent
    interval: tuple[float, float]  # always-valid (1 - alpha) confidence interval of the difference
    outcomes: tuple[int, int]  # (candidate, incumbent) outcomes counted


def outcomes(arm: ArmStats) -> tuple[int, int]:
    """(successes, trials) the test uses: thumbs up and head-to-head wins succeed; thumbs down,
    regenerations and head-to-head losses fail.

    The one place the outcome rule lives (see the module docstring for why silence is left out).
    The service should count `regenerated` on answers without a thumbs down, or such an answer
    counts as two failures (both signals say the same thing, so that only weights it).
    """
    return arm.up + arm.won, arm.up + arm.down + arm.regenerated + arm.won + arm.lost


def combine(per_subject: Iterable[ArmStats]) -> ArmStats:
    """One arm's stats from each end user's own stats, keeping what cluster-robust V needs."""
    rows = list(per_subject)
    pairs = [outcomes(r) for r in rows]
    return ArmStats(
        answers=sum(r.answers for r in rows),
        up=sum(r.up for r in rows),
        down=sum(r.down for r in rows),
        regenerated=sum(r.regenerated for r in rows),
        won=sum(r.won for r in rows),
        lost=sum(r.lost for r in rows),
        clusters=Clusters(
            subjects=sum(1 for _, n in pairs if n),
            ss=sum(s * s for s, _ in pairs),
            sn=sum(s * n for s, n in pairs),
            nn=sum(n * n for _, n in pairs),
        ),
    )


def variance(arm: ArmStats) -> float:
    """Variance of the arm's rate: binomial with Laplace-smoothed p (never 0), or, with
    per-subject counts, the larger of that and the cluster-robust (ratio-estimator) variance."""
    s, n = outcomes(arm)
    if n == 0:
        return math.inf
    p = (s + 1) / (n + 2)
    binomial = p * (1 - p) / n
    c = arm.clusters
    if c is None or c.subjects < 2:
        return binomial
    rate = s / n
    squares = c.ss - 2 * rate * c.sn + rate * rate * c.nn  # sum of (s_u - rate * n_u)^2
    return max(binomial, squares * c.subjects / (c.subjects - 1) / n**2)


def covariance(per_subject: Iterable[tuple[ArmStats, ArmStats]]) -> float:
    """Cluster-robust covariance of the (candidate, incumbent) rates from each end user's pair of
    stats (a person served by one arm only has zeros for the other). Only people counted in both
    arms add to it: in practice through head-to-head picks, where it is negative."""
    rows = [(outcomes(c), outcomes(i)) for c, i in per_subject]
    sc, nc = sum(c[0] for c, _ in rows), sum(c[1] for c, _ in rows)
    si, ni = sum(i[0] for _, i in rows), sum(i[1] for _, i in rows)
    subjects = sum(1 for c, i in rows if c[1] or i[1])
    if not nc or not ni or subjects < 2:
        return 0.0
    rc, ri = sc / nc, si / ni
    cross = sum((c[0] - rc * c[1]) * (i[0] - ri * i[1]) for c, i in rows)
    return cross * subjects / (subjects - 1) / (nc * ni)


def half_width(v: float, tau: float, alpha: float) -> float:
    """Half-width of the mSPRT confidence sequence at estimator variance v (see the docstring)."""
    if math.isinf(v):
        return math.inf
    t2 = tau * tau
    return math.sqrt(v * (v + t2) / t2 * (2 * math.log(1 / alpha) + math.log((v + t2) / v)))


def interval(
    candidate: ArmStats, incumbent: ArmStats, policy: CanaryPolicy, cov: float = 0.0
) -> tuple[float, float]:
    """The always-valid (1 - alpha) interval of candidate rate - incumbent rate, within [-1, 1].
    `cov`: the rates' covariance (`covariance`); only a negative one is used."""
    v = variance(candidate) + variance(incumbent) - 2 * min(cov, 0.0)
    h = half_width(v, policy.tau, policy.alpha)
    d = _rate(candidate) - _rate(incumbent)
    return max(-1.0, d - h), min(1.0, d + h)


def decide(
    candidate: ArmStats,
    incumbent: ArmStats,
    policy: CanaryPolicy,
    elapsed_hours: float,
    cov: float = 0.0,
) -> Decision:
    """Promote, roll back, stop or continue; safe to call after every new outcome. `cov`: the
    rates' covariance when some people are counted in both arms (head-to-head picks)."""
    (cs, cn), (is_, in_) = outcomes(candidate), outcomes(incumbent)
    low, high = interval(candidate, incumbent, policy, cov)
    counts = (
        f"candidate {_rate(candidate):.3f} ({cs}/{cn}) vs incumbent {_rate(incumbent):.3f} "
        f"({is_}/{in_}), {1 - policy.alpha:.0%} always-valid interval of the difference "
        f"[{low:+.3f}, {high:+.3f}]"
    )
    timed_out = elapsed_hours >= policy.max_hours
    if min(cn, in_) < policy.min_outcomes:
        action = "stop" if timed_out else "continue"
        why = f"{counts}; waiting for {policy.min_outcomes} outcomes per arm"
        why += f" at the limit of {policy.max_hours:g} h; the incumbent stays" if timed_out else ""
    elif low > -policy.margin:
        action, why = "promote", f"{counts}: lower bound > {0.0 - policy.margin:+.3f}"
    elif high < 0:
        action, why = "rollback", f"{counts}: upper bound < 0"
    elif timed_out or min(cn, in_) >= policy.max_outcomes:
        limit = f"{policy.max_outcomes} outcomes per arm"
        limit = f"{policy.max_hours:g} h" if timed_out else limit
        action, why = "stop", f"{counts}: undecided at the limit of {limit}; the incumbent stays"
    else:
        action, why = "continue", f"{counts}: undecided"
    return Decision(
        action=action,
        reason=why,
        candidate_rate=_rate(candidate),
        incumbent_rate=_rate(incumbent),
        difference=_rate(candidate) - _rate(incumbent),
        interval=(low, high),
        outcomes=(cn, in_),
    )


def assign(experiment_id: str, subject: str, share: float) -> bool:
    """True: this subject gets the candidate. Sticky and the same in every process and restart:
    sha256 of the experiment and subject, mapped to [0, 1), compared with the share."""
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    digest = hashlib.sha256(f"{experiment_id}\x00{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def _rate(arm: ArmStats) -> float:
    s, n = outcomes(arm)
    return s / n if n else 0.0
