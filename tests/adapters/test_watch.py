"""Live-watch statistics: a one-sided two-proportion z-test with a minimum sample size."""

from __future__ import annotations

import math

import pytest

from adapters.watch import Tally, WatchConfig, compare, one_sided_p


def test_p_value_matches_the_z_test_by_hand() -> None:
    new, old = Tally(up=20, down=30), Tally(up=35, down=15)  # 0.40 vs 0.70
    pooled = 55 / 100
    z = 0.30 / math.sqrt(pooled * (1 - pooled) * (1 / 50 + 1 / 50))
    assert one_sided_p(new, old) == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))
    assert one_sided_p(new, old) == pytest.approx(0.00128, abs=2e-5)
    # Better than before: p is large.
    assert one_sided_p(old, new) > 0.99


def test_a_clear_drop_rolls_back_with_a_readable_reason() -> None:
    verdict = compare(Tally(20, 30), Tally(35, 15), WatchConfig(min_votes=30))
    assert verdict.rollback
    assert verdict.reason.startswith(
        "thumbs-up rate 0.40 (20/50) vs previous 0.70 (35/50): drop +0.30, one-sided p=0.0013"
    )


def test_too_few_votes_never_roll_back() -> None:
    verdict = compare(Tally(0, 29), Tally(29, 0), WatchConfig(min_votes=30))
    assert not verdict.rollback
    assert verdict.reason == (
        "waiting for votes: 29 on the new version, 29 on the previous (need 30 each)"
    )


def test_noise_and_tiny_drops_do_not_roll_back() -> None:
    assert not compare(Tally(33, 17), Tally(35, 15), WatchConfig()).rollback  # p ~ 0.34
    # Significant but smaller than min_drop: kept.
    huge = compare(Tally(6800, 3200), Tally(7100, 2900), WatchConfig(min_drop=0.05))
    assert huge.p_value is not None and huge.p_value < 0.01 and not huge.rollback
    # Everyone unhappy with both: no evidence either way.
    assert not compare(Tally(0, 40), Tally(0, 40), WatchConfig()).rollback
