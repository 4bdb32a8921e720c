"""The console's overview numbers through real HTTP, with API keys on and two tenants: feedback
per day, the thumbs-up rate per adapter version, what waits for review and the last refresh,
each operator seeing its own tenant's only (an admin every tenant's)."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from service.storage.tables import Completion
from tests.service.conftest import Live
from tests.service.test_auth import Keys, error


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {
        "auth": "keys",
        "auth_cache_seconds": 0.0,
        "segments": ["default", "acme"],
        "segment_tenants": {"acme": "acme"},
        "pairs_require_approval": True,
        "rate_limit_requests_per_minute": 10_000,
    }


def get(live: Live, key: dict[str, str], **params: Any) -> dict[str, Any]:
    r = live.http.get("/v1/operator/overview", params=params, headers=key)
    assert r.status_code == 200, r.text
    return r.json()


def rate(live: Live, key: dict[str, str], body: dict[str, Any]) -> None:
    r = live.http.post("/v1/feedback", json=body, headers=key)
    assert r.status_code == 201, r.text


def test_overview_counts_per_day_version_review_and_last_run(live: Live) -> None:
    keys = Keys(live)
    d_user, a_user = keys.make("user", "default"), keys.make("user", "acme")
    d_ops, a_ops, admin = keys.make("operator"), keys.make("operator", "acme"), keys.make("admin")

    # Nothing yet: every day is there with zeros, nothing waits, no run.
    empty = get(live, a_ops, days=3)
    today = datetime.now(UTC).date()
    assert [d["day"] for d in empty["feedback_per_day"]] == [
        str(today - timedelta(days=n)) for n in (2, 1, 0)
    ]
    assert all(d["thumbs_up"] == d["picks"] == 0 for d in empty["feedback_per_day"])
    assert (empty["thumbs_rate"], empty["pending_pairs"], empty["last_run"]) == ([], 0, None)

    # Tenant default: three thumbs (one on an answer relabelled as default@v1's) and a pick;
    # tenant acme: one thumbs down.
    answers = [
        keys.chat(d_user, messages=[{"role": "user", "content": f"q{i}"}]).json() for i in range(3)
    ]
    with live.session() as s:
        row = s.get(Completion, answers[2]["id"])
        row.adapter_version = "default@v1"
        s.add(row)
        s.commit()
    for answer, rating in zip(answers, (1, -1, 1), strict=True):
        rate(live, d_user, {"completion_id": answer["id"], "rating": rating})
    two = keys.chat(d_user, n=2, temperature=1.0, seed=9).json()
    rate(live, d_user, {"completion_id": two["id"], "type": "pick", "chosen_index": 1})
    acme = keys.chat(a_user, model="acme").json()
    rate(live, a_user, {"completion_id": acme["id"], "rating": -1})
    compiled = live.http.post("/v1/operator/pairs/compile", headers=d_ops).json()

    mine = get(live, d_ops)
    assert mine["days"] == 14 and len(mine["feedback_per_day"]) == 14
    assert mine["feedback_per_day"][-1] == {
        "day": str(today), "thumbs_up": 2, "thumbs_down": 1, "picks": 1, "edits": 0,
    }  # fmt: skip
    assert datetime.fromisoformat(mine["since"]).date() == today - timedelta(days=13)
    by_version = {s["version"]: s["points"] for s in mine["thumbs_rate"]}
    assert set(by_version) == {"base", "default@v1"}
    [base], [v1] = by_version["base"], by_version["default@v1"]
    assert (base["up"], base["down"], base["rate"]) == (1, 1, 0.5)
    assert (v1["up"], v1["down"], v1["rate"]) == (1, 0, 1.0)
    assert date.fromisoformat(base["t"][:10]) == today
    # The pick's pair waits for approval (and the lone thumbs the gate kept, as KTO rows).
    assert mine["pending_pairs"] == compiled["pairs"] == 1
    assert mine["pending_unpaired"] == compiled["unpaired"]

    theirs = get(live, a_ops)
    assert theirs["feedback_per_day"][-1]["thumbs_down"] == 1
    assert sum(d["thumbs_up"] + d["picks"] for d in theirs["feedback_per_day"]) == 0
    assert [s["version"] for s in theirs["thumbs_rate"]] == ["base"]
    assert theirs["pending_pairs"] == 0  # acme's thumbs were not compiled (default's operator)
    everyone = get(live, admin)
    assert everyone["feedback_per_day"][-1]["thumbs_down"] == 2

    # A refresh with nothing approved is skipped; its operator's overview says so, the other
    # tenant's does not see it.
    run = live.http.post("/v1/operator/runs", json={"segment": "default"}, headers=d_ops).json()
    deadline = time.monotonic() + 60
    while (last := get(live, d_ops)["last_run"])["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, last
        time.sleep(0.2)
    assert (last["id"], last["status"]) == (run["id"], "skipped")
    assert "approved training items" in last["error"]
    assert get(live, a_ops)["last_run"] is None
    assert get(live, admin)["last_run"]["id"] == run["id"]

    # Bad input is a 400 that names the parameter; users are not operators.
    r = live.http.get("/v1/operator/overview", params={"days": 0}, headers=d_ops)
    assert r.status_code == 400 and error(r)["param"] == "days"
    assert live.http.get("/v1/operator/overview", headers=d_user).status_code == 403
