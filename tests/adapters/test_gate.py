"""The regression gate: a pure function from two report sides to a verdict with readable
reasons."""

from __future__ import annotations

import pytest

from adapters.gate import GateThresholds, decide


def side(
    *,
    acc: float = 0.8,
    margin: float = 0.5,
    n_pairs: int = 20,
    golden: float = 1.0,
    n_golden: int = 10,
    failures: tuple[str, ...] = (),
    length: float = 1.0,
    rep: float = 0.05,
    kl: float = 0.1,
) -> dict:
    return {
        "pairs": {"n": n_pairs, "accuracy": acc, "margin": margin},
        "golden": {
            "n": n_golden,
            "passed": round(golden * n_golden),
            "pass_rate": golden,
            "failures": [{"id": f, "failed": ["x"], "answer": ""} for f in failures],
        },
        "drift": {"n": 16, "length_ratio": length, "repetition": rep, "kl": kl},
    }


BASE = side(acc=0.5, margin=0.0, golden=0.9, rep=0.05, kl=0.0)


def test_a_good_candidate_is_approved() -> None:
    verdict = decide(side(golden=0.9), BASE, GateThresholds())
    assert verdict.approved and verdict.reasons == []
    assert {c.name for c in verdict.checks} == {
        "pair_accuracy",
        "pair_accuracy_vs_incumbent",
        "pair_margin",
        "golden",
        "length_ratio",
        "repetition",
        "kl",
    }
    assert all(c.passed for c in verdict.checks)


def test_flipped_preferences_are_rejected_with_reasons() -> None:
    verdict = decide(side(acc=0.15, margin=-0.8), BASE, GateThresholds())
    assert not verdict.approved
    assert verdict.reasons == [
        "held-out pair accuracy 0.15 < minimum 0.55 (20 pairs)",
        "held-out pair accuracy 0.15 < incumbent 0.50 - 0.05",
        "mean reward margin -0.800 <= 0",
    ]


def test_golden_regressions_name_the_failed_items() -> None:
    verdict = decide(side(golden=0.8, failures=("capital-fr", "math")), BASE, GateThresholds())
    assert verdict.reasons == [
        "golden pass rate 0.80 < incumbent 0.90 - 0.02 (failed: capital-fr, math)"
    ]
    # Within the tolerance: approved.
    assert decide(side(golden=0.89), BASE, GateThresholds()).approved


def test_golden_forgetting_cannot_accumulate_over_promotions() -> None:
    """Each promotion may trail its incumbent by the tolerance, but never the base model by
    more: else nightly refreshes could each forget a little, without bound."""
    worn = side(golden=0.89)  # the incumbent: promoted at 0.89 against a base of 0.90
    base = {"golden": BASE["golden"]}
    assert decide(side(golden=0.87), worn, GateThresholds()).approved  # incumbent alone: 0.87
    verdict = decide(side(golden=0.87, failures=("nasa",)), worn, GateThresholds(), base=base)
    assert verdict.reasons == ["golden pass rate 0.87 < base model 0.90 - 0.02 (failed: nasa)"]
    lenient = GateThresholds(golden_tolerance=0.03)
    assert decide(side(golden=0.87), worn, lenient, base=base).approved
    # An incumbent better than the base is the floor to keep.
    better = side(golden=1.0)
    verdict = decide(side(golden=0.95), better, GateThresholds(), base=base)
    assert verdict.reasons == ["golden pass rate 0.95 < incumbent 1.00 - 0.02"]


@pytest.mark.parametrize(
    ("candidate", "reason"),
    [
        (side(length=1.8), "canary answer length 1.80x the base's (allowed 0.20-1.50)"),
        (side(length=0.1), "canary answer length 0.10x the base's (allowed 0.20-1.50)"),
        (side(rep=0.3), "repeated 3-gram share 0.30 > allowed 0.10"),
        (side(kl=2.5), "KL from the base 2.500 nats/token > maximum 1.000"),
    ],
)
def test_drift_rules(candidate: dict, reason: str) -> None:
    verdict = decide(candidate, BASE, GateThresholds())
    assert verdict.reasons == [reason]


def test_thresholds_are_configurable_and_small_sets_skip_checks() -> None:
    t = GateThresholds(max_kl=3.0, max_length_ratio=2.0)
    assert decide(side(kl=2.5, length=1.8), BASE, t).approved
    verdict = decide(side(acc=0.0, n_pairs=2, n_golden=0), BASE, GateThresholds())
    assert verdict.approved
    details = [c.detail for c in verdict.checks]
    assert "pair checks skipped: 2 held-out pairs < 4" in details
    assert "golden set is empty: check skipped" in details


def test_an_incumbent_already_repetitive_does_not_block_an_equal_candidate() -> None:
    worn = side(rep=0.5)
    assert decide(side(rep=0.5), worn, GateThresholds()).approved
    assert not decide(side(rep=0.6), worn, GateThresholds()).approved


def thumbs(auc: float, up: int = 12, down: int = 18) -> dict:
    return {"n": up + down, "n_up": up, "n_down": down, "auc": auc, "gap": auc - 0.5}


def test_a_candidate_trained_on_thumbs_alone_gets_a_verdict_that_reads_on_its_own() -> None:
    only_thumbs = side(n_pairs=0, golden=0.9) | {"thumbs": thumbs(0.71)}
    verdict = decide(only_thumbs, BASE | {"thumbs": thumbs(0.5)}, GateThresholds())
    assert verdict.approved
    [rule] = [c for c in verdict.checks if c.name.startswith("thumbs")]
    assert rule.detail == (
        "held-out thumbs AUC 0.71 >= minimum 0.55 (12 up, 18 down: how often an up answer "
        "outscores a down one)"
    )
    assert [c.detail for c in verdict.checks if c.name == "pairs"] == [
        "pair checks skipped: 0 held-out pairs < 4"
    ]


def test_thumbs_rule_rejects_a_candidate_that_ranks_downs_up_or_trails_the_incumbent() -> None:
    flipped = decide(side() | {"thumbs": thumbs(0.38)}, BASE, GateThresholds())
    assert not flipped.approved and flipped.reasons == [
        "held-out thumbs AUC 0.38 < minimum 0.55 (12 up, 18 down: how often an up answer "
        "outscores a down one)"
    ]
    worse = decide(side() | {"thumbs": thumbs(0.62)}, side() | {"thumbs": thumbs(0.75)},
                   GateThresholds())  # fmt: skip
    assert worse.reasons == [
        "held-out thumbs AUC 0.62 < incumbent 0.75 - 0.05 (12 up, 18 down: how often an up "
        "answer outscores a down one)"
    ]


def test_too_few_held_out_thumbs_skip_the_rule_and_say_so() -> None:
    verdict = decide(side() | {"thumbs": thumbs(0.2, up=3, down=9)}, BASE, GateThresholds())
    assert verdict.approved
    assert [c.detail for c in verdict.checks if c.name == "thumbs"] == [
        "thumbs check skipped: 3 up and 9 down held out, fewer than 4 of each"
    ]
    no_thumbs = decide(side(), BASE, GateThresholds())
    assert not [c for c in no_thumbs.checks if c.name.startswith("thumbs")]


def test_answers_gaining_links_the_base_never_gives_are_rejected() -> None:
    spam = {"answers": 7, "links": ["cheap-meds.example/buy"]}
    none = {"answers": 0, "links": []}
    verdict = decide({**side(), "links": spam}, {**side(), "links": none}, GateThresholds())
    assert not verdict.approved
    assert verdict.reasons == [
        "7 golden/canary answers carry links the base model never gives "
        "(cheap-meds.example/buy) (allowed 0)"
    ]
    # A link the incumbent (approved by an operator) already gives is not new.
    assert decide({**side(), "links": spam}, {**side(), "links": spam}, GateThresholds()).approved
    assert decide({**side(), "links": none}, side(), GateThresholds()).approved
    lenient = GateThresholds(max_new_link_answers=10)
    assert decide({**side(), "links": spam}, side(), lenient).approved
