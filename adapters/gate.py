"""The regression gate: one pure function from two evaluation reports to a verdict with reasons.

The reports are ``trainer.evaluate``'s sides: the candidate and the incumbent (the segment's
active version, or the base model when none is active), both scored on the same held-out pairs,
golden set and canary prompts. Every rule produces a line that reads on its own in the console
and the audit log, e.g. ``golden pass rate 0.82 < incumbent 0.90 - 0.02``.

The rules guard against what DPO users report going wrong: a candidate that prefers the wrong
answers (poisoned or flipped data: pair accuracy; for lone thumbs, the AUC of its implied
reward at ranking held-out thumbs-up answers above thumbs-down ones), forgets what it knew
(golden set), grows its answers (length ratio), degenerates into loops (repetition), or drifts
far from the base (KL per token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GateThresholds:
    min_pair_accuracy: float = 0.55  # on held-out pairs, ties count half (the base scores 0.5)
    pair_accuracy_tolerance: float = 0.05  # may trail the incumbent by this much
    min_pairs: int = 4  # fewer held-out pairs: the pair rule is skipped, and says so
    # Held-out lone thumbs: the candidate's implied reward must rank ups above downs (AUC; the
    # base scores 0.5) at least this well, and not trail the incumbent's AUC by more than the
    # tolerance. Skipped with fewer than `min_thumbs` ups or downs.
    min_thumbs_auc: float = 0.55
    thumbs_auc_tolerance: float = 0.05
    min_thumbs: int = 4
    golden_tolerance: float = 0.02  # golden pass rate may trail the incumbent by this much
    min_golden_pass_rate: float = 0.0
    max_length_ratio: float = 1.5  # mean canary answer length / the base's
    min_length_ratio: float = 0.2
    max_repetition: float = 0.35  # share of repeated token 3-grams in canary answers
    repetition_tolerance: float = 0.05  # may exceed the incumbent's by this much
    max_kl: float = 1.0  # nats per token from the base, along its own canary answers
    # Golden and canary answers carrying links the base model never gives (and the incumbent
    # did not either): link spam learnt from poisoned feedback. 0: any such answer rejects.
    max_new_link_answers: int = 0


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Verdict:
    approved: bool
    reasons: list[str]  # the failed checks' details; empty when approved
    checks: list[Check] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "approved": self.approved,
            "reasons": self.reasons,
            "checks": [asdict(c) for c in self.checks],
        }


def decide(
    candidate: dict[str, Any],
    incumbent: dict[str, Any],
    t: GateThresholds,
    base: dict[str, Any] | None = None,
) -> Verdict:
    """``candidate`` and ``incumbent`` are report sides: ``{"pairs", "golden", "drift"}``;
    ``base`` the base model's ``{"golden"}`` (the report's ``base_model``), where the incumbent
    is an adapter. Every rule below adds its checks; a failed one is a reason to reject."""
    checks: list[Check] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append(Check(name, bool(ok), detail))

    _pair_checks(candidate.get("pairs") or {}, incumbent.get("pairs") or {}, t, check)
    _thumbs_checks(candidate.get("thumbs") or {}, incumbent.get("thumbs") or {}, t, check)
    _golden_check(
        candidate.get("golden") or {},
        incumbent.get("golden") or {},
        (base or {}).get("golden") or {},
        t,
        check,
    )
    _drift_checks(candidate.get("drift") or {}, incumbent.get("drift") or {}, t, check)
    _links_check(candidate, incumbent, t, check)

    reasons = [c.detail for c in checks if not c.passed]
    return Verdict(approved=not reasons, reasons=reasons, checks=checks)


Checker = Callable[[str, bool, str], None]


def _pair_checks(
    pairs: dict[str, Any], inc_pairs: dict[str, Any], t: GateThresholds, check: Checker
) -> None:
    """Held-out pairs: the candidate prefers the chosen answers, and no less than the incumbent."""
    n = int(pairs.get("n", 0))
    if n < t.min_pairs:
        check("pairs", True, f"pair checks skipped: {n} held-out pairs < {t.min_pairs}")
        return
    acc = float(pairs["accuracy"])
    check(
        "pair_accuracy",
        acc >= t.min_pair_accuracy,
        f"held-out pair accuracy {acc:.2f} {_cmp(acc >= t.min_pair_accuracy)} "
        f"minimum {t.min_pair_accuracy:.2f} ({n} pairs)",
    )
    if inc_pairs.get("n"):
        inc = float(inc_pairs["accuracy"])
        floor = inc - t.pair_accuracy_tolerance
        check(
            "pair_accuracy_vs_incumbent",
            acc >= floor,
            f"held-out pair accuracy {acc:.2f} {_cmp(acc >= floor)} incumbent "
            f"{inc:.2f} - {t.pair_accuracy_tolerance:.2f}",
        )
    margin = float(pairs.get("margin", 0.0))
    check(
        "pair_margin",
        margin > 0,
        f"mean reward margin {margin:+.3f} {'>' if margin > 0 else '<='} 0",
    )


def _golden_check(
    golden: dict[str, Any],
    inc_golden: dict[str, Any],
    base_golden: dict[str, Any],
    t: GateThresholds,
    check: Checker,
) -> None:
    """The golden set: the candidate forgets nothing the incumbent or the base model knew."""
    if not golden.get("n"):
        check("golden", True, "golden set is empty: check skipped")
        return
    rate = float(golden["pass_rate"])
    inc_rate = float(inc_golden.get("pass_rate", 0.0)) if inc_golden.get("n") else 0.0
    # Against the base model too: a tolerance against the incumbent alone lets every
    # nightly promotion forget a little more, without bound.
    base_rate = float(base_golden["pass_rate"]) if base_golden.get("n") else inc_rate
    floor_side, floor_rate = (
        ("incumbent", inc_rate) if inc_rate >= base_rate else ("base model", base_rate)
    )
    floor = max(t.min_golden_pass_rate, floor_rate - t.golden_tolerance)
    failed = [f["id"] for f in golden.get("failures", [])][:5]
    check(
        "golden",
        rate >= floor - 1e-9,
        f"golden pass rate {rate:.2f} {_cmp(rate >= floor - 1e-9)} {floor_side} "
        f"{floor_rate:.2f} - {t.golden_tolerance:.2f}"
        + (f" (failed: {', '.join(failed)})" if failed else ""),
    )


def _drift_checks(
    drift: dict[str, Any], inc_drift: dict[str, Any], t: GateThresholds, check: Checker
) -> None:
    """Canary prompts: answer length, repetition and KL from the base stay within bounds."""
    if not drift.get("n"):
        check("drift", True, "no canary prompts: drift checks skipped")
        return
    ratio = float(drift["length_ratio"])
    check(
        "length_ratio",
        t.min_length_ratio <= ratio <= t.max_length_ratio,
        f"canary answer length {ratio:.2f}x the base's "
        f"(allowed {t.min_length_ratio:.2f}-{t.max_length_ratio:.2f})",
    )
    rep = float(drift["repetition"])
    ceiling = min(
        t.max_repetition, float(inc_drift.get("repetition", 0.0)) + t.repetition_tolerance
    )
    ceiling = max(ceiling, float(inc_drift.get("repetition", 0.0)))  # never stricter than now
    check(
        "repetition",
        rep <= ceiling + 1e-9,
        f"repeated 3-gram share {rep:.2f} {_cmp(rep <= ceiling + 1e-9, '<=', '>')} "
        f"allowed {ceiling:.2f}",
    )
    kl = float(drift["kl"])
    check(
        "kl",
        kl <= t.max_kl,
        f"KL from the base {kl:.3f} nats/token {_cmp(kl <= t.max_kl, '<=', '>')} "
        f"maximum {t.max_kl:.3f}",
    )


def _links_check(
    candidate: dict[str, Any],
    incumbent: dict[str, Any],
    t: GateThresholds,
    check: Checker,
) -> None:
    found = candidate.get("links")
    if found is None:  # a report from before the rule
        return
    known = set((incumbent.get("links") or {}).get("links", []))
    new = [link for link in found["links"] if link not in known]
    count = found["answers"] if new else 0
    check(
        "links",
        count <= t.max_new_link_answers,
        f"{count} golden/canary answers carry links the base model never gives"
        + (f" ({', '.join(new[:5])})" if new else "")
        + f" (allowed {t.max_new_link_answers})",
    )


def _thumbs_checks(
    thumbs: dict[str, Any], inc: dict[str, Any], t: GateThresholds, check: Checker
) -> None:
    ups, downs = int(thumbs.get("n_up", 0)), int(thumbs.get("n_down", 0))
    if min(ups, downs) < t.min_thumbs:
        if ups or downs:
            check("thumbs", True, f"thumbs check skipped: {ups} up and {downs} down held out, "
                  f"fewer than {t.min_thumbs} of each")  # fmt: skip
        return
    auc = float(thumbs["auc"])
    floor, against = t.min_thumbs_auc, f"minimum {t.min_thumbs_auc:.2f}"
    if "auc" in inc and float(inc["auc"]) - t.thumbs_auc_tolerance > floor:
        floor = float(inc["auc"]) - t.thumbs_auc_tolerance
        against = f"incumbent {float(inc['auc']):.2f} - {t.thumbs_auc_tolerance:.2f}"
    check(
        "thumbs_auc",
        auc >= floor,
        f"held-out thumbs AUC {auc:.2f} {_cmp(auc >= floor)} {against} "
        f"({ups} up, {downs} down: how often an up answer outscores a down one)",
    )


def _cmp(ok: bool, yes: str = ">=", no: str = "<") -> str:
    return yes if ok else no
