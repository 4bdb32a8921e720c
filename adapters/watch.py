"""Live watch: is the newly promoted version liked significantly less than its predecessor?

Pure statistics over thumbs counts; the service feeds it the counts per version and acts on the
verdict. The test is a one-sided two-proportion z-test (pooled variance) on the thumbs-up rate,
run only once both versions have a minimum number of votes, and it also needs the drop to be
at least ``min_drop`` so that a statistically clear but tiny dip on huge traffic does not
trigger a rollback.

Run repeatedly as votes arrive, the test peeks many times; ``alpha`` is per look. The defaults
(alpha 0.01, 30 votes a side) keep false rollbacks rare, and a false rollback is cheap: the
previous version was serving yesterday.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Tally:
    up: int
    down: int

    @property
    def n(self) -> int:
        return self.up + self.down

    @property
    def rate(self) -> float:
        return self.up / self.n if self.n else 0.0


@dataclass(frozen=True)
class WatchConfig:
    min_votes: int = 30  # per version, before any test
    alpha: float = 0.01  # one-sided significance level
    min_drop: float = 0.05  # smallest drop in thumbs-up rate worth a rollback


@dataclass(frozen=True)
class WatchVerdict:
    rollback: bool
    reason: str
    p_value: float | None = None


def compare(new: Tally, old: Tally, cfg: WatchConfig) -> WatchVerdict:
    """Should ``new`` (the active version since its promotion) be rolled back to ``old``?"""
    if new.n < cfg.min_votes or old.n < cfg.min_votes:
        return WatchVerdict(
            False,
            f"waiting for votes: {new.n} on the new version, {old.n} on the previous "
            f"(need {cfg.min_votes} each)",
        )
    p = one_sided_p(new, old)
    drop = old.rate - new.rate
    summary = (
        f"thumbs-up rate {new.rate:.2f} ({new.up}/{new.n}) vs previous {old.rate:.2f} "
        f"({old.up}/{old.n}): drop {drop:+.2f}, one-sided p={p:.4f}"
    )
    if p < cfg.alpha and drop >= cfg.min_drop:
        return WatchVerdict(True, f"{summary} < alpha {cfg.alpha}", p)
    return WatchVerdict(False, summary, p)


def one_sided_p(new: Tally, old: Tally) -> float:
    """P(a drop at least this large | both versions are equally liked)."""
    pooled = (new.up + old.up) / (new.n + old.n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / new.n + 1 / old.n))
    if se == 0:
        return 1.0 if new.rate >= old.rate else 0.0
    z = (old.rate - new.rate) / se
    return 0.5 * math.erfc(z / math.sqrt(2))
