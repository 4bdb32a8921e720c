"""PROVISIONAL stand-in for the stats helper's `adapters/canary.py` (branch wt-cstats): the
interface of /work/notes/canary-design.md with a plain normal-approximation interval, so the
service side can be built and tested. The merge replaces this file with the real one."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ArmStats:
    answers: int
    up: int
    down: int
    regenerated: int


@dataclass(frozen=True)
class CanaryPolicy:
    margin: float = 0.0
    alpha: float = 0.05
    min_outcomes: int = 20
    max_outcomes: int = 5000
    max_hours: float = 168.0


@dataclass(frozen=True)
class Decision:
    action: Literal["continue", "promote", "rollback", "stop"]
    reason: str
    candidate_rate: float
    incumbent_rate: float
    difference: float
    interval: tuple[float, float]
    outcomes: tuple[int, int]


def outcomes(arm: ArmStats) -> tuple[int, int]:
    """(successes, trials): a thumbs-up succeeds; a thumbs-down or a regeneration fails."""
    return arm.up, arm.up + arm.down + arm.regenerated


def decide(
    candidate: ArmStats, incumbent: ArmStats, policy: CanaryPolicy, elapsed_hours: float
) -> Decision:
    (sc, nc), (si, ni) = outcomes(candidate), outcomes(incumbent)
    pc, pi = (sc / nc if nc else 0.0), (si / ni if ni else 0.0)
    diff = pc - pi
    z = 2.5758 if policy.alpha <= 0.01 else 1.96
    se = math.sqrt(pc * (1 - pc) / max(nc, 1) + pi * (1 - pi) / max(ni, 1)) or 1e-9
    lo, hi = diff - z * se, diff + z * se

    def verdict(action: str, why: str) -> Decision:
        return Decision(action, why, pc, pi, diff, (lo, hi), (nc, ni))  # type: ignore[arg-type]

    if min(nc, ni) < policy.min_outcomes:
        if elapsed_hours >= policy.max_hours:
            return verdict("stop", f"ran {elapsed_hours:.1f} h without enough outcomes")
        return verdict("continue", f"waiting for {policy.min_outcomes} outcomes per arm")
    if lo > -policy.margin and (policy.margin > 0 or lo > 0):
        return verdict("promote", f"candidate {pc:.2f} vs incumbent {pi:.2f}: better")
    if hi < -policy.margin or (policy.margin == 0 and hi < 0):
        return verdict("rollback", f"candidate {pc:.2f} vs incumbent {pi:.2f}: worse")
    if min(nc, ni) >= policy.max_outcomes or elapsed_hours >= policy.max_hours:
        return verdict("stop", "no clear difference before the limit")
    return verdict("continue", "no clear difference yet")


def assign(experiment_id: str, subject: str, share: float) -> bool:
    digest = hashlib.sha256(f"{experiment_id}\0{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share
