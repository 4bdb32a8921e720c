"""The console's live canaries in a real browser (issue 23): the Experiments tab's empty state,
a canary started from the Adapters tab's form against the active version, its arms' counts
moving while end users rate answers through the HTTP API, the interval drawn against 0 and
-margin, the decision in words, the Overview's line, and Stop after a confirmation with a
reason, audited. Real LoRA adapters on the tiny random Llama, as in tests/service/test_canary.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from sqlmodel import select

from adapters.canary import assign
from adapters.registry import APPROVED, Registry
from service.storage.tables import OperatorAction
from tests.service.conftest import Live, approved
from tests.service.test_canary import experiment as detail
from tests.service.test_canary import wait_until

pytestmark = pytest.mark.slow  # a real Chromium: seconds per test

OPS = {"X-Operator": "olga"}
HELLO = [{"role": "user", "content": "Help me, please."}]


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # No decision loop: the test, not a background look, ends the experiment. A low minimum
    # so that a handful of votes already gives the test an interval to draw.
    return {"watch_interval_seconds": 0, "canary": {"min_outcomes": 3}}


def vote(live: Live, exp_id: str, candidate: str) -> dict[str, list[int]]:
    """Twenty end users on each side ask once and rate: 13 of the candidate's answers liked, 9
    of the incumbent's. Returns each arm's [answers, up, down] as served."""
    users = [f"user-{i}" for i in range(200)]
    sides = {
        "candidate": [u for u in users if assign(exp_id, u, 0.5)][:20],
        "incumbent": [u for u in users if not assign(exp_id, u, 0.5)][:20],
    }
    # A probe on the candidate's side asks until the split reaches this replica; its answers
    # count as answers (unrated) on whichever arm served them.
    counts = {"candidate": [0, 0, 0], "incumbent": [0, 0, 0]}
    probe = next(u for u in (f"probe-{i}" for i in range(200)) if assign(exp_id, u, 0.5))
    deadline = time.monotonic() + 15
    while live.chat(HELLO, user=probe)["adapter_version"] != candidate:
        counts["incumbent"][0] += 1
        assert time.monotonic() < deadline, "the candidate never served"
    counts["candidate"][0] += 1
    for arm, liked in (("candidate", 13), ("incumbent", 9)):
        for j, user in enumerate(sides[arm]):
            answer = live.chat(HELLO, user=user)
            assert (answer["adapter_version"] == candidate) == (arm == "candidate")  # sticky
            r = live.feedback(completion_id=answer["id"], rating=1 if j < liked else -1, user=user)
            assert r.status_code == 201, r.text
        counts[arm] = [counts[arm][0] + 20, liked, 20 - liked]
    return counts


def test_a_canary_from_start_to_stop(
    live: Live, page: Page, registry: Registry, lora: list[Path]
) -> None:
    v1, v2 = approved(registry, lora[0]), approved(registry, lora[1])
    registry.promote(v1, actor="test")
    wait_until(lambda: live.chat(HELLO, user="anyone")["adapter_version"] == v1, timeout=15.0)

    page.goto(f"{live.base_url}/console")
    page.get_by_label("Operator", exact=True).fill("olga")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#ov-run-text")).to_contain_text("No refresh has run yet.")
    expect(page.locator("#ov-canary")).to_be_hidden()

    # Nothing yet: the Experiments tab says what a canary is and how to start one.
    page.get_by_role("tab", name="Experiments").click()
    empty = page.locator("#exp-cards .exp-empty")
    expect(empty).to_contain_text("No canary experiment yet")
    expect(empty).to_contain_text("PREFLOOP_CANARY_SHARE")
    expect(empty).to_contain_text("Start canary")
    expect(page.locator("#exp-rows tr.empty")).to_contain_text("No experiments yet")
    page.shots("empty")

    # Adapters: the approved version's form, against the active version shown.
    page.get_by_role("tab", name="Adapters").click()
    row = page.locator(f'#adapter-rows tr[data-id="{v2}"]')
    expect(page.locator(f'#adapter-rows tr[data-id="{v1}"]')).to_contain_text("active")
    expect(
        page.locator(f'#adapter-rows tr[data-id="{v1}"]').get_by_role("button", name="Start canary")
    ).to_have_count(0)
    row.get_by_role("button", name="Start canary").click()
    form = page.get_by_role("form", name=f"Start a canary of {v2}")
    expect(form).to_contain_text(f"{v2} against {v1}, the active version")
    form.get_by_label("Share of users (%)").fill("50")
    form.get_by_label("Margin (points it may be worse by)").fill("2")
    page.wait_for_timeout(2500)  # the tab's own refresh must not redraw the form away
    expect(form).to_be_visible()
    page.shots("start-form")
    form.get_by_role("button", name="Start canary").click()
    expect(page.get_by_role("status")).to_contain_text("started: ")
    expect(page.get_by_role("tab", name="Experiments")).to_have_attribute("aria-selected", "true")

    [exp] = live.http.get("/v1/operator/experiments", headers=OPS).json()["data"]
    assert (exp["candidate"], exp["incumbent"], exp["share"]) == (v2, v1, 0.5)
    assert exp["policy"]["margin"] == 0.02 and exp["created_by"] == "olga"
    card = page.locator(f'#exp-cards article[data-id="{exp["id"]}"]')
    expect(card.locator("h2")).to_have_text(f"Canary on default: {v2} vs {v1}")
    expect(card.locator(".exp-status")).to_have_text("running")
    expect(card).to_contain_text("50% of the segment's users get the candidate")
    expect(card.locator("dl.policy")).to_contain_text("2.0 points (promote if worse by less)")
    expect(card.locator("dl.policy")).to_contain_text("at least 3 before deciding, at most 5000")
    expect(card.locator("dl.policy")).to_contain_text("of at most 168 h")
    expect(card.locator(".exp-decision")).to_contain_text("Waiting for evidence")

    # End users rate answers through the HTTP API; the view follows by itself.
    counts = vote(live, exp["id"], v2)
    shown = detail(live, exp["id"])
    for arm, (answers, up, down) in counts.items():
        cells = card.locator(f'tr[data-arm="{arm}"] td')
        expect(cells.nth(2)).to_have_text(str(answers), timeout=10_000)  # polled, no click
        expect(cells.nth(3)).to_have_text(str(up))
        expect(cells.nth(4)).to_have_text(str(down))
        rate = next(a["rate"] for a in shown["arms"] if a["arm"] == arm)
        expect(cells.nth(6)).to_have_text(f"{round(rate * 1000) / 10:g}%")
    low, high = shown["decision"]["interval"]
    bar = card.locator("svg.interval rect.bar")
    assert float(bar.get_attribute("data-low")) == pytest.approx(low)
    assert float(bar.get_attribute("data-high")) == pytest.approx(high)
    expect(card.locator("svg.interval text.threshold-zero")).to_have_text("0")
    expect(card.locator("svg.interval text.threshold-margin")).to_have_text("−margin (−2.0)")
    assert shown["decision"]["action"] == "continue"  # 20 votes a side decide nothing yet
    assert -1 < low < -0.02 < 0 < high  # liked better, but not yet by enough to be sure
    decision = card.locator(".exp-decision")
    expect(decision).to_contain_text("Still running: the interval of the difference runs from ")
    expect(decision).to_contain_text("still reaches below −margin (−2.0 points) and above 0")
    card.scroll_into_view_if_needed()
    page.shots("running")

    # The Overview's line, and its link back here.
    page.get_by_role("tab", name="Overview").click()
    line = page.locator(f'#ov-canary p[data-id="{exp["id"]}"]')
    expect(page.locator("#ov-canary-status")).to_have_text("running")
    expect(line).to_contain_text(f"{v2} vs {v1} on 50% of default, since ")
    page.shots("overview")
    line.get_by_role("link", name="Show the experiment").click()
    expect(card).to_be_visible()

    # Stop asks first: cancelled, nothing changes; confirmed with a reason, it ends.
    card.get_by_role("button", name="Stop").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"Stop: {v2} on default?")
    expect(dialog).to_contain_text("the incumbent keeps serving everyone")
    page.shots("confirm")
    dialog.get_by_role("button", name="Cancel").click()
    expect(page.get_by_role("status")).to_have_text("Cancelled.")
    assert detail(live, exp["id"])["status"] == "running"
    card.get_by_role("button", name="Stop").click()
    dialog.get_by_label("Reason (optional, kept in the audit log)").fill("holiday traffic")
    dialog.get_by_role("button", name="Confirm").click()
    expect(page.get_by_role("status")).to_contain_text(f"{exp['id']} ended: stopped.")
    expect(card.locator(".exp-status")).to_have_text("stopped")
    expect(card.locator(".exp-ended")).to_contain_text(", stopped: stop by olga: holiday traffic")
    for name in ("Stop", "Promote now", "Roll back"):
        expect(card.get_by_role("button", name=name)).to_be_disabled()
    expect(page.locator(f'#exp-rows tr[data-id="{exp["id"]}"]')).to_contain_text("stopped")
    page.shots("stopped")
    assert registry.get(v2).status == APPROVED and registry.active()["default"].id == v1

    with live.session() as s:
        audit = s.exec(
            select(OperatorAction).where(OperatorAction.action.startswith("canary"))
        ).all()
    assert [(a.action, a.actor, a.target_ids[0]) for a in audit] == [
        ("canary.start", "olga", exp["id"]),
        ("canary.stop", "olga", exp["id"]),
    ]
    assert audit[1].detail["reason"] == "stop by olga: holiday traffic"
    page.get_by_role("tab", name="Overview").click()
    expect(page.locator("#ov-feedback-total")).to_have_text("40")
    expect(page.locator("#ov-canary")).to_be_hidden()  # none runs now


def test_promote_now_is_refused_when_the_incumbent_changed_and_roll_back_rejects(
    live: Live, page: Page, registry: Registry, lora: list[Path]
) -> None:
    v1, v2 = approved(registry, lora[0]), approved(registry, lora[1])
    body = {"candidate": v1, "share": 0.3, "expect_incumbent": "base"}
    r = live.http.post("/v1/operator/experiments", json=body, headers=OPS)
    assert r.status_code == 201, r.text
    exp_id = r.json()["id"]

    page.goto(f"{live.base_url}/console")
    page.get_by_label("Operator", exact=True).fill("rui")
    page.get_by_role("button", name="Save").click()
    page.get_by_role("tab", name="Experiments").click()
    card = page.locator(f'#exp-cards article[data-id="{exp_id}"]')
    expect(card.locator("h2")).to_have_text(f"Canary on default: {v1} vs the base model")
    expect(card.locator('tr[data-arm="incumbent"] td').nth(1)).to_have_text("the base model")
    expect(card.locator("svg.interval text.threshold-zero")).to_have_text("0 = −margin")
    expect(card).to_contain_text("No difference yet: each arm needs rated or regenerated answers.")
    expect(card.locator("svg.interval circle")).to_have_count(0)  # no rates, no point
    expect(card.locator("dl.policy")).to_contain_text(
        "0 (promote only when the candidate is better)"
    )

    # Another operator promotes a version meanwhile: promoting the canary now would compare
    # the wrong pair, and the service refuses; the console says why and nothing changes.
    registry.promote(v2, actor="another operator")
    card.get_by_role("button", name="Promote now").click()
    page.get_by_role("dialog").get_by_role("button", name="Confirm").click()
    expect(page.get_by_role("alert")).to_contain_text(
        f"the incumbent changed: 'default' is now served by {v2}"
    )
    expect(card.locator(".exp-status")).to_have_text("running")

    card.get_by_role("button", name="Roll back").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("the candidate is rejected")
    dialog.get_by_role("button", name="Confirm").click()  # no reason: optional
    expect(card.locator(".exp-status")).to_have_text("rolled back")
    expect(card.locator(".exp-ended")).to_contain_text(", rolled back: rollback by rui")
    expect(card.get_by_role("button", name="Roll back")).to_be_disabled()
    assert registry.get(v1).status == "rejected"
    page.shots("rolled-back")
