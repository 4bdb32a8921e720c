"""The operator console in a real browser: review feedback with filters, write an ideal answer,
compile and review pairs (one by one and in bulk), start a refresh and watch it train (the
loss plot) and gate (the report beside the active version's), promote the candidate after a
confirmation, watch the thumbs-up rate per version, and roll back. A tiny random Llama trains
in the refresh's subprocesses, as in tests/service/test_refresh.py."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from sqlmodel import select

from service.storage.tables import Feedback, OperatorAction, PreferencePair
from tests.service.conftest import Live
from tests.service.test_refresh import FAST, OPS, picks, wait_run

# A real Chromium: seconds per test.
pytestmark = pytest.mark.slow

# uPlot draws each series in its colour (console.js COLORS): the first and second series.
ORANGE, BLUE = (0xD9, 0x48, 0x0F), (0x1C, 0x7E, 0xD6)
PIXELS = """([selector, rgb]) => {
  const canvas = document.querySelector(selector);
  if (!canvas) return 0;
  const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 200 && Math.abs(d[i] - rgb[0]) < 30 && Math.abs(d[i + 1] - rgb[1]) < 30
        && Math.abs(d[i + 2] - rgb[2]) < 30) n++;
  }
  return n;
}"""


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # Pairs wait for an operator's approval; the candidate waits for the operator to promote.
    # Batches of 2 so the loss plot has several steps: with FAST's 4, a hold-out that leaves 4
    # or fewer of the 10 pairs to train on gave one step, a single dot of 12 pixels (CI, once).
    train = {**FAST["refresh_train"], "batch_size": 2}
    return {**FAST, "refresh_train": train, "pairs_require_approval": True,
            "refresh_auto_promote": False}  # fmt: skip


def pairs(live: Live, **where: Any) -> list[PreferencePair]:
    with live.session() as s:
        q = select(PreferencePair)
        for k, v in where.items():
            q = q.where(getattr(PreferencePair, k) == v)
        return list(s.exec(q).all())


def thumbs(live: Live, count: int, rating: int, comment: str | None = None) -> list[dict]:
    answers = []
    for i in range(count):
        answer = live.chat([{"role": "user", "content": f"Thumbs {rating} {i} {time.time()}"}])
        body = {"completion_id": answer["id"], "rating": rating, "user": f"t{i}"}
        if comment:
            body["comment"] = comment
        assert live.feedback(**body).status_code == 201
        answers.append(answer)
    return answers


def test_review_train_promote_cycle(live: Live, page: Page) -> None:
    for i in range(10):  # A/B picks: each compiles into one pair
        answer = live.chat([{"role": "user", "content": f"Question {i}: tell me a thing."}], n=2)
        r = live.feedback(completion_id=answer["id"], type="pick", chosen_index=i % 2, user=f"u{i}")
        assert r.status_code == 201, r.text
    thumbs(live, 3, 1)
    [disliked] = thumbs(live, 1, -1, comment="wrong and rude")

    page.goto(f"{live.base_url}/console")
    page.get_by_label("Operator", exact=True).fill("olga")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("status")).to_contain_text("Operating as olga")

    # Feedback queue: filter down to thumbs-down with a comment, and write the ideal answer.
    page.get_by_role("tab", name="Feedback").click()
    feedback_rows = page.locator("#feedback-rows tr[data-id]")
    expect(feedback_rows).to_have_count(14)
    filters = page.locator("#feedback-filters")
    filters.get_by_label("Rating").select_option("-1")
    filters.get_by_label("Comment").select_option("true")
    filters.get_by_role("button", name="Apply filters").click()
    expect(feedback_rows).to_have_count(1)
    expect(feedback_rows.first).to_contain_text("wrong and rude")
    expect(feedback_rows.first).to_contain_text(disliked["choices"][0]["message"]["content"])
    filters.get_by_label("Adapter version").fill("default@v9")
    filters.get_by_role("button", name="Apply filters").click()
    expect(feedback_rows).to_have_count(0)
    expect(page.locator("#feedback-rows tr.empty")).to_have_text(
        "No feedback matches these filters. Clear a filter to see more."
    )
    filters.get_by_label("Adapter version").fill("base")
    filters.get_by_role("button", name="Apply filters").click()
    expect(feedback_rows).to_have_count(1)
    page.shots("feedback")
    feedback_rows.first.get_by_role("button", name="Write ideal answer").click()
    # A roomy editor under the row, beside the answer given; it grows with what is typed.
    editor = page.get_by_label("The ideal answer")
    expect(editor).to_be_focused()
    expect(page.locator("tr.editor .given")).to_have_text(
        disliked["choices"][0]["message"]["content"]
    )
    short = editor.bounding_box()["height"]
    editor.fill("A kind and correct answer.\n" + "More detail.\n" * 20)
    assert editor.bounding_box()["height"] > short + 100
    assert editor.bounding_box()["width"] > 500
    page.shots("ideal-answer-editor")
    editor.fill("A kind and correct answer.")
    page.get_by_role("button", name="Save ideal answer").click()
    expect(feedback_rows.first).to_contain_text("ideal answer saved")
    with live.session() as s:
        edit = s.exec(select(Feedback).where(Feedback.kind == "edit")).one()
    assert (edit.edited_text, edit.author_role) == ("A kind and correct answer.", "operator")
    assert edit.completion_id == disliked["id"]

    # Pairs: compile, then approve / flip / exclude / rewrite single pairs, the rest in bulk.
    page.get_by_role("tab", name="Pairs").click()
    page.locator("#pair-filters").get_by_label("Kind").select_option("pair")
    page.get_by_role("button", name="Compile new pairs now").click()
    expect(page.get_by_role("status")).to_contain_text("Compiled: 11 new pair(s)")
    rows = page.locator("#pair-rows tr[data-id]")
    expect(rows).to_have_count(11)
    page.shots("pairs")
    first_id = rows.nth(0).get_attribute("data-id")
    rows.nth(0).get_by_role("button", name="Approve").click()
    expect(page.get_by_role("status")).to_contain_text("approve: 1 pair(s) by olga")
    expect(rows).to_have_count(10)  # the filter shows pending pairs
    flip_id = rows.nth(0).get_attribute("data-id")
    before = pairs(live, id=flip_id)[0]
    rows.nth(0).get_by_role("button", name="Flip").click()
    expect(page.get_by_role("status")).to_contain_text("flip: 1 pair(s)")
    after = pairs(live, id=flip_id)[0]
    assert (after.chosen, after.rejected) == (before.rejected, before.chosen)
    exclude_id = rows.nth(1).get_attribute("data-id")
    rows.nth(1).get_by_role("button", name="Exclude").click()
    expect(rows).to_have_count(9)
    rewrite = rows.nth(1)
    rewrite_id = rewrite.get_attribute("data-id")
    rewrite.get_by_role("button", name="Write ideal answer").click()
    page.get_by_label("The ideal answer").fill("The operator's better answer.")
    page.get_by_role("button", name="Save ideal answer").click()
    expect(page.get_by_role("status")).to_contain_text("replace_chosen: 1 pair(s)")
    page.get_by_label("Select all pairs").check()
    expect(page.get_by_text("9 selected")).to_be_visible()
    page.get_by_role("button", name="Approve selected").click()
    expect(page.get_by_role("status")).to_contain_text("approve: 9 pair(s) by olga")
    expect(rows).to_have_count(0)
    # A filter is on (pairs only; lone thumbs may still wait): the empty table says so.
    expect(page.locator("#pair-rows tr.empty")).to_have_text(
        "No pairs match these filters. Clear a filter, or choose another status."
    )
    assert pairs(live, id=first_id)[0].status == "approved"
    assert pairs(live, id=exclude_id)[0].status == "excluded"
    assert pairs(live, id=rewrite_id)[0].chosen == "The operator's better answer."
    assert len(pairs(live, status="approved")) == 10
    with live.session() as s:
        actions = s.exec(select(OperatorAction).where(OperatorAction.actor == "olga")).all()
    assert sorted(a.action for a in actions) == [
        "compile", "pairs.approve", "pairs.approve", "pairs.exclude", "pairs.flip",
        "pairs.replace_chosen",
    ]  # fmt: skip

    # Runs: start a refresh and watch it to the end.
    page.get_by_role("tab", name="Runs").click()
    page.get_by_role("button", name="Start refresh").click()
    summary = page.locator("#run-summary")
    expect(summary).to_contain_text("Status: ", timeout=10_000)
    expect(summary).to_contain_text("Status: succeeded", timeout=180_000)
    expect(summary).to_contain_text("outcome approved")
    # The steps, in words: each done, with its time and key numbers (no promote step: the
    # operator promotes).
    steps = page.locator("#run-steps > li")
    expect(steps).to_have_count(6)
    expect(page.locator("#run-steps > li.step-done")).to_have_count(6)
    assert [steps.nth(i).get_attribute("data-step") for i in range(6)] == [
        "compile", "select", "train", "register", "evaluate", "gate",
    ]  # fmt: skip
    expect(steps.nth(0)).to_contain_text("Compile feedback")
    expect(steps.nth(1)).to_contain_text("10 approved items: ")
    expect(steps.nth(2)).to_contain_text(re.compile(r"\d+ optimizer steps"))
    expect(steps.nth(3)).to_contain_text("candidate default@v1")
    expect(steps.nth(5)).to_contain_text("the candidate passed")
    expect(steps.nth(2).locator(".step-time")).to_have_text(re.compile(r"^\d+(\.\d)? s$|min"))
    expect(steps.nth(2).locator("details.raw pre")).to_be_hidden()  # raw numbers: on request
    expect(page.locator("#run-gate")).to_contain_text("The gate approved the candidate.")
    expect(page.locator("#run-gate th").nth(1)).to_have_text("candidate default@v1")
    expect(page.locator("#run-gate th").nth(2)).to_have_text("active when gated: the base model")
    expect(page.locator("#run-log")).to_contain_text("trainer train")
    assert page.evaluate(PIXELS, ["#run-chart canvas", ORANGE]) > 20  # loss
    assert page.evaluate(PIXELS, ["#run-chart canvas", BLUE]) > 20  # reward margin
    page.shots("run")

    # Adapters: promoting asks first; cancelled, nothing changes.
    page.get_by_role("tab", name="Adapters").click()
    row = page.locator('#adapter-rows tr[data-id="default@v1"]')
    expect(row).to_contain_text("approved")
    page.once("dialog", lambda d: d.dismiss())
    row.get_by_role("button", name="Promote").click()
    expect(page.get_by_role("status")).to_have_text("Cancelled.")
    assert live.http.get("/v1/operator/adapters").json()["serving"] == {}
    messages: list[str] = []
    page.once("dialog", lambda d: (messages.append(d.message), d.accept()))
    row.get_by_role("button", name="Promote").click()
    expect(row).to_contain_text("active")
    assert messages and messages[0].startswith("Promote default@v1?")
    expect(page.locator("#serving")).to_contain_text("default → default@v1", timeout=15_000)
    row.get_by_role("button", name="Details").click()
    expect(page.locator("#adapter-events")).to_contain_text("approved → active by olga")
    page.shots("adapters")

    # Live thumbs-up rate per version: the new version's votes join the base model's.
    deadline = time.monotonic() + 5
    while live.chat([{"role": "user", "content": "hi"}])["adapter_version"] != "default@v1":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    thumbs(live, 2, 1)
    page.get_by_role("tab", name="Thumbs-up rate").click()
    page.locator("#rate-filters").get_by_label("Bucket").select_option("60")
    page.locator("#rate-filters").get_by_role("button", name="Apply").click()
    rate_rows = page.locator("#rate-rows tr")
    expect(rate_rows).to_have_count(2)
    expect(rate_rows.nth(0)).to_have_text("base310.750")  # 3 up, 1 down
    expect(rate_rows.nth(1)).to_have_text("default@v1201")
    page.wait_for_function("() => document.querySelector('#rate-chart canvas')")
    assert page.evaluate(PIXELS, ["#rate-chart canvas", ORANGE]) > 10  # base
    assert page.evaluate(PIXELS, ["#rate-chart canvas", BLUE]) > 10  # default@v1
    page.shots("rate")

    # Roll back, after a confirmation: the base model serves again.
    page.get_by_role("tab", name="Adapters").click()
    page.once("dialog", lambda d: d.accept())
    row.get_by_role("button", name="Roll back").click()
    expect(page.get_by_role("status")).to_contain_text("Segment default now serves the base model")
    expect(row).to_contain_text("retired")
    assert live.http.get("/v1/operator/adapters").json()["serving"] == {}


def test_console_says_what_went_wrong(live: Live, page: Page) -> None:
    page.goto(f"{live.base_url}/console")
    page.get_by_role("tab", name="Runs").click()
    page.locator("#start-run").get_by_label("Segment").fill("Not A Segment!")
    page.get_by_role("button", name="Start refresh").click()
    expect(page.get_by_role("alert")).to_contain_text(
        "segment 'Not A Segment!' is not valid: use 1-64 lowercase letters"
    )
    page.shots("error")


GREEN = (0x2B, 0x8A, 0x3E)  # console.js COLORS[2]: the third series


@pytest.mark.parametrize(
    "settings_overrides",
    # Half held out so the gate has thumbs to judge by; one batch per step, so every step has
    # ups and downs and plots the thumbs reward gap.
    [{**FAST, "refresh_heldout_fraction": 0.5,
      "refresh_train": {**FAST["refresh_train"], "batch_size": 64, "epochs": 3}}],
)  # fmt: skip
def test_a_run_on_lone_thumbs_shows_what_it_trained_on_and_the_thumbs_rule(
    live: Live, page: Page
) -> None:
    # Visitors who each ask once and rate the one answer they got: 40 questions asked once
    # (half up, half down: both sides of the hold-out get both), 6 asked by three visitors.
    for i in range(58):
        question = f"Q{i}: a cat name?" if i < 40 else f"Question {i % 6}: name my cat?"
        answer = live.chat([{"role": "user", "content": question}], user=f"visitor-{i}")
        rating = 1 if i % 2 else -1
        r = live.feedback(completion_id=answer["id"], rating=rating, user=f"visitor-{i}")
        assert r.status_code == 201, r.text
    run = live.http.post("/v1/operator/runs", json={"segment": "default"}, headers=OPS).json()

    page.goto(f"{live.base_url}/console")
    page.get_by_label("Operator", exact=True).fill("olga")
    page.get_by_role("button", name="Save").click()
    page.get_by_role("tab", name="Runs").click()
    row = page.locator(f'#run-rows tr[data-id="{run["id"]}"]')
    row.get_by_role("button", name="Show").click()
    expect(page.locator("#run-summary")).to_contain_text("Status: succeeded", timeout=180_000)
    data = page.locator("#run-data")
    expect(data).to_contain_text("Trained on 0 pairs, ")
    expect(data).to_contain_text(" matched from thumbs, ")
    expect(data).to_contain_text(" down alone (KTO); held out for the gate: 0 pairs, ")
    expect(page.locator("#run-progress-text")).to_contain_text("thumbs reward gap")
    gate = page.locator("#run-gate")
    expect(gate).to_contain_text("thumbs AUC (up above down)")
    # The rule's line: judged, or skipped and saying so when too few were held out.
    expect(gate.locator("li").filter(has_text="thumbs")).to_have_count(1)
    assert page.evaluate(PIXELS, ["#run-chart canvas", GREEN]) > 20  # the thumbs reward gap

    # What the new adapter changed: held-out prompts, each with both versions' answers, as
    # the evaluation recorded them.
    version = live.http.get("/v1/operator/runs/" + run["id"], headers=OPS).json()
    adapter = live.http.get(
        f"/v1/operator/adapters/{version['candidate_version']}", headers=OPS
    ).json()
    samples = adapter["eval_report"]["samples"]
    assert 1 <= len(samples) <= 8
    cards = page.locator("#run-samples .sample")
    expect(cards).to_have_count(len(samples))
    for i, sample in enumerate(samples):
        card = cards.nth(i)
        assert card.locator(".prompt").text_content() == sample["prompt"][-1]["content"]
        assert card.locator(".side-candidate .answer").text_content() == (
            sample["candidate"] or "(an empty answer)"
        )
        assert card.locator(".side-incumbent .answer").text_content() == (
            sample["incumbent"] or "(an empty answer)"
        )
    expect(cards.first.locator(".side-incumbent h5")).to_have_text(
        "active when gated: the base model"
    )
    page.locator("#run-samples").scroll_into_view_if_needed()
    page.shots("thumbs-run")


@pytest.mark.parametrize(
    "settings_overrides",
    [{**FAST, "pairs_require_approval": True, "refresh_auto_promote": True}],
)
def test_overview_starts_empty_then_shows_feedback_review_and_the_last_refresh(
    live: Live, page: Page
) -> None:
    # Nothing yet: each part of the landing page says what will appear and how.
    page.goto(f"{live.base_url}/console")
    expect(page.get_by_role("tab", name="Overview")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#ov-volume")).to_contain_text("No feedback yet.")
    expect(page.locator("#ov-rate")).to_contain_text("No thumbs in these days yet.")
    expect(page.locator("#ov-pending-text")).to_contain_text("Nothing waits for review.")
    expect(page.locator("#ov-run-text")).to_contain_text("No refresh has run yet.")
    expect(page.locator("#ov-feedback-total")).to_have_text("0")
    page.shots("overview-empty")
    for tab, rows, sentence in (
        ("Feedback", "#feedback-rows", "No feedback yet."),
        ("Pairs", "#pair-rows", "Nothing waits for review."),
        ("Runs", "#run-rows", "No refresh has run yet."),
        ("Adapters", "#adapter-rows", "No adapter versions yet"),
    ):
        page.get_by_role("tab", name=tab).click()
        expect(page.locator(f"{rows} tr.empty")).to_contain_text(sentence)
    page.get_by_role("tab", name="Thumbs-up rate").click()
    expect(page.locator("#rate-chart")).to_contain_text("No thumbs in this period.")

    # Votes on the base model, picks that an operator approves, a refresh that promotes
    # default@v1, votes on it, and new picks waiting for review; all through the HTTP API.
    thumbs(live, 2, 1)
    thumbs(live, 2, -1)
    picks(live, 10)
    live.compile()
    ids = [
        p["id"] for p in live.http.get("/v1/operator/pairs?limit=200", headers=OPS).json()["data"]
    ]
    body = {"action": "approve", "ids": ids}
    assert live.http.post("/v1/operator/pairs/actions", json=body, headers=OPS).status_code == 200
    run = live.http.post("/v1/operator/runs", json={"segment": "default"}, headers=OPS).json()
    done = wait_run(live, run["id"])
    assert (done["status"], done["outcome"]) == ("succeeded", "promoted"), done["error"]
    deadline = time.monotonic() + 5
    while live.chat([{"role": "user", "content": "hi"}])["adapter_version"] != "default@v1":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    thumbs(live, 3, 1)
    thumbs(live, 1, -1)
    for i in range(2):
        answer = live.chat([{"role": "user", "content": f"Later {i}: which?"}], n=2)
        r = live.feedback(completion_id=answer["id"], type="pick", chosen_index=0, user=f"l{i}")
        assert r.status_code == 201, r.text
    waiting = live.compile()

    page.get_by_role("tab", name="Overview").click()
    expect(page.locator("#ov-feedback-total")).to_have_text("20")  # 8 thumbs, 12 picks
    expect(page.locator("#ov-feedback-split")).to_have_text(
        "5 thumbs up, 3 thumbs down, 12 picks, 0 ideal answers"
    )
    today = page.locator("#ov-volume g.day").last
    expect(today.locator("title")).to_have_text(
        re.compile(r": 5 thumbs up, 3 thumbs down, 12 picks$")
    )
    expect(today.locator("rect[data-series]")).to_have_count(3)
    expect(page.locator("#ov-volume g.day")).to_have_count(14)
    rate = page.locator("#ov-rate g.series")
    expect(rate).to_have_count(2)
    assert [rate.nth(i).get_attribute("data-series") for i in range(2)] == ["base", "default@v1"]
    expect(rate.nth(0).locator("circle title")).to_contain_text("50% of 4 (2 up, 2 down)")
    expect(rate.nth(1).locator("circle title")).to_contain_text("75% of 4 (3 up, 1 down)")
    expect(page.locator("#ov-rate-legend")).to_have_text("base: 50% of 4 default@v1: 75% of 4")
    pending = waiting["stored"].get("pending", 0)
    assert pending >= 2  # the two picks, and lone thumbs the quality gate kept
    expect(page.locator("#ov-pending-count")).to_have_text(str(pending))
    expect(page.locator("#ov-run-status")).to_have_text("promoted")
    expect(page.locator("#ov-run-text")).to_contain_text(
        "default@v1 passed the gate and serves now. (default, finished "
    )
    page.shots("overview")

    # From the overview to the run, and to the pairs waiting for review.
    page.get_by_role("button", name="Show the run").click()
    expect(page.locator("#run-title")).to_have_text(f"Run {run['id']} (default)")
    expect(page.locator("#run-steps > li.step-done")).to_have_count(7)  # promoted too
    page.get_by_role("tab", name="Overview").click()
    page.get_by_role("button", name="Review pairs").click()
    expect(page.locator("#pair-rows tr[data-id]")).to_have_count(pending)
