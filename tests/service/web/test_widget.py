"""The chat widget in a real browser, as a person uses it: open the bubble on the demo page,
chat (answers stream), rate with the keyboard and the mouse, comment, regenerate, pick the
better of two, reload and go on; every signal is checked in the database. Model output and
stored messages that carry HTML are shown as text and never run."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from sqlmodel import col, select

from adapters.registry import Registry
from service.core.config import Settings
from service.storage.db import make_engine
from service.storage.tables import Completion, Feedback, Message
from tests.conftest import make_adapter
from tests.servers import free_port
from tests.service.conftest import Live
from tests.service.test_canary_duels import KEYS_ON, Canary

# A real Chromium: seconds per test.
pytestmark = pytest.mark.slow

XSS = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # Every second user turn asks for a comparison; short answers keep the test quick.
    return {"widget_compare_every": 2, "default_max_tokens": 12}


CUT_OFF = "Cut off: the answer reached its length limit."


def words(text: str) -> list[str]:
    """The words of an answer with Markdown's markup taken out, for comparing the page's text
    with the stored answer: links to their text, list markers and heading marks at the start
    of a line, and the characters of emphasis, code and fences. The same on both sides, so a
    random model's stray `*` or `1.` cannot make them differ."""
    text = re.sub(r"\[([^\]\n]+)\]\((https?://[^\s()]+)\)", r"\1", text)
    text = re.sub(r"(?m)^\s*([-*+]|\d{1,9}[.)])\s+", "", text, flags=re.A)
    text = re.sub(r"(?m)^\s*#{1,6}\s+", "", text)
    return re.sub(r"[`*_#~]", "", text).split()


def completions(live: Live) -> list[Completion]:
    with live.session() as s:
        return list(s.exec(select(Completion).order_by(col(Completion.created_at))).all())


def feedback(live: Live, **where: Any) -> list[Feedback]:
    with live.session() as s:
        q = select(Feedback)
        for k, v in where.items():
            q = q.where(getattr(Feedback, k) == v)
        return list(s.exec(q).all())


def wait_for(predicate, what: str, timeout: float = 15) -> Any:
    """The widget answers a click only after the service has committed: poll the database."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def tab_to(page: Page, label: str, limit: int = 30) -> None:
    """Press Tab until the focused element is the one with this aria-label."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        focused = page.evaluate(
            "() => { let e = document.activeElement;"
            " while (e && e.shadowRoot && e.shadowRoot.activeElement)"
            "   e = e.shadowRoot.activeElement;"
            " return e && e.getAttribute('aria-label'); }"
        )
        if focused == label:
            return
    raise AssertionError(f"Tab never reached {label!r}")


def test_chat_rate_regenerate_pick_and_reload(live: Live, page: Page) -> None:
    page.goto(f"{live.base_url}/demo")
    page.get_by_role("button", name="Open chat").click()
    box = page.get_by_label("Your message")
    expect(box).to_be_focused()
    page.shots("open")

    # Chat: Enter sends; the answer streams in, then its buttons appear.
    box.fill("What is the capital of France?")
    box.press("Enter")
    expect(page.get_by_role("button", name="Good answer (message 1)")).to_be_visible()
    first = wait_for(lambda: [c for c in completions(live) if c.status == "succeeded"], "answer")[0]
    assert first.stream is True and first.params["n"] == 1
    with live.session() as s:
        answer = s.exec(select(Message).where(Message.completion_id == first.id)).one()
        user_id = first.user_id
    assert user_id and user_id.startswith("widget-")
    shown = page.locator("[data-prefloop-widget] .assistant").first.inner_text()
    cut = CUT_OFF if answer.finish_reason == "length" else ""  # at max_tokens: it says so
    assert words(shown) == words(answer.content + "\n" + cut)
    page.shots("answered")

    # Thumbs up with the keyboard alone: Tab to the button, Enter.
    tab_to(page, "Good answer (message 1)")
    page.keyboard.press("Enter")
    up = wait_for(lambda: feedback(live, kind="thumbs", value=1), "thumbs up")[0]
    assert (up.completion_id, up.user_id, up.comment) == (first.id, user_id, None)
    expect(page.get_by_role("button", name="Good answer (message 1)")).to_have_attribute(
        "aria-pressed", "true"
    )

    # Changed their mind: thumbs down with a comment (the later vote replaces the first).
    page.get_by_role("button", name="Bad answer (message 1)").click()
    wait_for(lambda: feedback(live, kind="thumbs", value=-1), "thumbs down")
    page.get_by_label("Comment (optional, message 1)").fill("too vague")
    page.get_by_role("button", name="Send comment (message 1)").click()
    expect(page.get_by_text("Thanks for the feedback and the comment.")).to_be_visible()
    [down] = feedback(live, kind="thumbs")
    assert (down.value, down.comment, down.completion_id) == (-1, "too vague", first.id)
    page.shots("rated")

    # Regenerate: a sibling answer to the same prompt.
    page.get_by_role("button", name="Regenerate answer (message 1)").click()
    expect(page.get_by_role("button", name="Good answer (message 1)")).to_have_attribute(
        "aria-pressed", "false"
    )
    again = wait_for(
        lambda: [c for c in completions(live) if c.regenerated_from == first.id],
        "the regeneration",
    )[0]
    wait_for(lambda: completions(live)[-1].status == "succeeded", "the regenerated answer")
    assert again.parent_message_id == first.parent_message_id

    # The second turn asks for a comparison (n=2): pick B. The user's HTML is shown as text.
    box.fill(f"Which is better? {XSS}")
    box.press("Enter")
    expect(page.get_by_role("button", name="Answer B is better (message 2)")).to_be_visible()
    page.shots("compare")
    page.get_by_role("button", name="Answer B is better (message 2)").click()
    expect(page.get_by_text("Thanks — you picked B.")).to_be_visible()
    [pick] = wait_for(lambda: feedback(live, kind="pick"), "the pick")
    compared = completions(live)[-1]
    assert compared.params["n"] == 2 and pick.completion_id == compared.id and pick.value == 1
    assert compared.conversation_id == first.conversation_id
    with live.session() as s:  # continuing from the regenerated answer marked it kept
        kept = s.exec(select(Message).where(Message.completion_id == again.id)).one()
        prompt = s.get(Message, compared.parent_message_id)
    assert kept.kept_at is not None and prompt.parent_id == kept.id
    assert prompt.content == f"Which is better? {XSS}"
    expect(page.get_by_text(XSS)).to_be_visible()
    assert page.evaluate("() => window.__pwned") is None

    # Reload: the conversation is still there, and the next turn continues it.
    page.reload()
    expect(page.get_by_text("Thanks — you picked B.")).to_be_visible()  # still open
    expect(page.get_by_text("What is the capital of France?")).to_be_visible()
    page.shots("reloaded")
    page.get_by_label("Your message").fill("And one more thing")
    page.get_by_label("Your message").press("Enter")
    expect(page.get_by_role("button", name="Good answer (message 3)")).to_be_visible()
    third = wait_for(lambda: len(completions(live)) == 4 and completions(live)[-1], "turn 3")
    assert third.conversation_id == first.conversation_id
    with live.session() as s:  # it continued from the picked answer (B)
        picked = s.exec(
            select(Message).where(Message.completion_id == compared.id, Message.choice_index == 1)
        ).one()
        assert s.get(Message, third.parent_message_id).parent_id == picked.id


def test_stored_html_is_shown_as_text_and_markdown_is_safe(live: Live, page: Page) -> None:
    page.goto(f"{live.base_url}/demo")
    stored = {
        "user": "widget-test",
        "conversation_id": None,
        "open": True,
        "turns": [
            {
                "user": "hi",
                "completion_id": "chatcmpl-x",
                "compare": False,
                "picked": None,
                "rating": None,
                "answers": [
                    {
                        "message_id": "msg-x",
                        "done": True,
                        "text": f"{XSS}\n**bold** and `<b>code</b>` and "
                        '[a link](https://example.com/a?b=1&c="2") and '
                        "[bad](javascript:window.__pwned=3)\n"
                        "```\n<script>window.__pwned=4</script>\n```",
                    }
                ],
            }
        ],
    }
    key = f"prefloop-widget:{live.base_url}:"
    page.evaluate("([k, v]) => localStorage.setItem(k, v)", [key, json.dumps(stored)])
    page.reload()
    answer = page.locator("[data-prefloop-widget] .assistant").first
    expect(answer).to_contain_text(XSS)
    expect(answer).to_contain_text("<script>window.__pwned=4</script>")
    assert answer.locator("img, script, iframe").count() == 0
    assert answer.locator("strong").inner_text() == "bold"
    assert answer.locator("code").first.inner_text() == "<b>code</b>"
    link = answer.locator("a")
    # The address as the browser's URL parser writes it: quotes escaped, not an attribute's end.
    assert link.count() == 1 and link.get_attribute("href") == "https://example.com/a?b=1&c=%222%22"
    assert link.get_attribute("rel") == "noopener noreferrer nofollow"
    expect(answer).to_contain_text("[bad](javascript:window.__pwned=3)")
    page.shots("markdown")
    assert page.evaluate("() => window.__pwned") is None


def test_errors_are_plain_words_and_keep_the_text(live: Live, page: Page) -> None:
    # An unknown segment: the service answers 404; the widget says why and keeps the text.
    logged: list[str] = []
    page.on("console", lambda m: logged.append(m.text))
    page.goto(f"{live.base_url}/demo?segment=nope")
    page.get_by_role("button", name="Open chat").click()
    page.get_by_label("Your message").fill("hello?")
    page.get_by_role("button", name="Send message").click()
    alert = page.get_by_role("alert")
    expect(alert).to_have_text("Sorry, the assistant could not answer. Please try again.")
    # The service's own words are for whoever debugs the page: the tooltip and the console.
    expect(alert).to_have_attribute("title", re.compile(r"^HTTP 404: the model 'nope' does not"))
    expect(page.get_by_label("Your message")).to_have_value("hello?")
    assert any(m.startswith("prefloop widget: HTTP 404: the model 'nope'") for m in logged)
    page.shots("unknown-segment")

    # A conversation kept in the browser that the service no longer has (a reset database).
    page.goto(f"{live.base_url}/demo")
    stale = {"user": "widget-x", "conversation_id": "conv-gone", "open": True, "turns": []}
    key = f"prefloop-widget:{live.base_url}:"
    page.evaluate("([k, v]) => localStorage.setItem(k, v)", [key, json.dumps(stale)])
    page.reload()
    page.get_by_label("Your message").fill("still there?")
    page.get_by_label("Your message").press("Enter")
    expect(page.get_by_role("alert")).to_have_text(
        "This conversation is no longer on the server. Press “New” to start a new one."
    )
    page.get_by_role("button", name="Start a new conversation").click()
    page.get_by_label("Your message").fill("still there?")
    page.get_by_label("Your message").press("Enter")
    expect(page.get_by_role("button", name="Good answer (message 1)")).to_be_visible()
    assert len(completions(live)) == 1

    # The service cannot be reached at all.
    dead = f"http://127.0.0.1:{free_port()}"
    page.set_content(f'<script src="{live.base_url}/widget.js" data-api-base="{dead}"></script>')
    page.get_by_role("button", name="Open chat").click()
    page.get_by_label("Your message").fill("anyone there?")
    page.get_by_label("Your message").press("Enter")
    alert = page.get_by_role("alert")
    expect(alert).to_have_text("Cannot reach the assistant. Check your connection, then try again.")
    expect(alert).to_have_attribute("title", re.compile(f"^{re.escape(dead)}/v1/chat/completions"))
    expect(page.get_by_label("Your message")).to_have_value("anyone there?")
    page.shots("unreachable")
    assert len(completions(live)) == 1  # nothing was stored for the failed ones


@pytest.mark.parametrize(
    "settings_overrides", [{"auth": "keys", "default_max_tokens": 8, "widget_compare_every": 0}]
)
def test_a_site_key_visitor_is_who_the_service_says(live: Live, page: Page) -> None:
    """With a public (site) key the widget keeps the visitor id the service signed and sends
    it back: the visitor's answers and votes carry that id, not the `user` the page made up;
    after a reload it is the same visitor."""
    from sqlalchemy import create_engine

    from service.auth import create_key

    _row, secret = create_key(
        create_engine(live.db_url), name="site", public=True, origins=[live.base_url]
    )
    page.goto(f"{live.base_url}/demo?key={secret}")
    page.get_by_role("button", name="Open chat").click()
    page.get_by_label("Your message").fill("Hello?")
    page.get_by_label("Your message").press("Enter")
    page.get_by_role("button", name="Bad answer (message 1)").click()
    down = wait_for(lambda: feedback(live, kind="thumbs", value=-1), "thumbs down")[0]
    stored = page.evaluate(
        "() => Object.keys(localStorage).map(k => JSON.parse(localStorage.getItem(k)))"
    )
    token = next(s["visitor"] for s in stored if s.get("visitor"))
    visitor = f"visitor:{token.split('.')[0]}"
    assert completions(live)[0].user_id == down.user_id == visitor

    page.reload()  # the chat reopens as it was left
    page.get_by_label("Your message").fill("Me again.")
    page.get_by_label("Your message").press("Enter")
    wait_for(lambda: len([c for c in completions(live) if c.status == "succeeded"]) == 2, "2nd")
    assert {c.user_id for c in completions(live)} == {visitor}
    page.shots("site-key-visitor")


def stored_answer(page: Page, live: Live, text: str, **answer: Any) -> Any:
    """Open the demo page on a conversation kept in the browser with one answer, `text`."""
    page.goto(f"{live.base_url}/demo")
    turn = {"user": "hi", "completion_id": "chatcmpl-x", "compare": False, "picked": None,
            "rating": None, "answers": [{"message_id": "msg-x", "done": True, "text": text,
                                         **answer}]}  # fmt: skip
    stored = {"user": "widget-test", "conversation_id": None, "open": True, "turns": [turn]}
    key = f"prefloop-widget:{live.base_url}:"
    page.evaluate("([k, v]) => localStorage.setItem(k, v)", [key, json.dumps(stored)])
    page.reload()
    return page.locator("[data-prefloop-widget] .assistant").first


CODE = """def greet(name):
    if name:
        return f"<b>hi {name}</b>"
\treturn   None  # spaces  kept"""


def test_code_keeps_its_whitespace_and_markdown_shapes_the_answer(live: Live, page: Page) -> None:
    text = (
        "Here is **the fix**, with _care_:\n\n"
        f"```python\n{CODE}\n```\n\n"
        "Or indented:\n\n    for i in range(3):\n        print(i)\n\n"
        "Steps:\n\n1. run `make  test`\n2. read [the docs](https://example.com/docs)\n\n"
        "- one\n- two *items*\n\n"
        "Line one\nline two"
    )
    answer = stored_answer(page, live, text)
    blocks = answer.locator("pre > code")
    expect(blocks).to_have_count(2)
    # textContent, not inner_text: the exact characters, tabs and runs of spaces included.
    assert blocks.nth(0).text_content() == CODE
    assert blocks.nth(0).get_attribute("data-lang") == "python"
    assert blocks.nth(1).text_content() == "for i in range(3):\n    print(i)"
    assert blocks.nth(0).evaluate("e => getComputedStyle(e).whiteSpace") == "pre"
    assert answer.locator("strong").first.inner_text() == "the fix"
    assert answer.locator("em").all_inner_texts() == ["care", "items"]
    assert answer.locator("ol > li").all_inner_texts() == ["run make  test", "read the docs"]
    assert answer.locator("ol code").text_content() == "make  test"
    assert answer.locator("ul > li").count() == 2
    link = answer.locator("a")
    assert link.get_attribute("href") == "https://example.com/docs"
    assert link.get_attribute("rel") == "noopener noreferrer nofollow"
    assert answer.locator("p").last.inner_html() == "Line one<br>line two"
    assert answer.locator(".cutoff").count() == 0  # it ended by itself
    page.shots("markdown-code")


@pytest.mark.parametrize(
    "settings_overrides", [{"default_max_tokens": 4, "widget_compare_every": 0}]
)
def test_an_answer_cut_at_its_length_limit_says_so(live: Live, page: Page) -> None:
    # A few tokens: the random test model never says its end-of-sequence token so soon.
    page.goto(f"{live.base_url}/demo")
    page.get_by_role("button", name="Open chat").click()
    page.get_by_label("Your message").fill("Tell me a long story.")
    page.get_by_label("Your message").press("Enter")
    expect(page.get_by_role("button", name="Good answer (message 1)")).to_be_visible()
    [done] = wait_for(lambda: [c for c in completions(live) if c.status == "succeeded"], "answer")
    with live.session() as s:
        message = s.exec(select(Message).where(Message.completion_id == done.id)).one()
    assert (done.params["max_tokens"], message.finish_reason) == (4, "length")
    marker = page.locator("[data-prefloop-widget] .assistant .cutoff")
    expect(marker).to_have_text(CUT_OFF)
    expect(marker.locator("svg")).to_have_count(1)
    page.shots("cut-off")
    page.reload()  # the kept conversation, painted without streaming, says so too
    expect(marker).to_have_count(1)


@pytest.mark.parametrize(
    "settings_overrides",
    [{"auth": "keys", "default_max_tokens": 4, "widget_compare_every": 0,
      "rate_limit_visitor_requests_per_minute": 1}],
)  # fmt: skip
def test_too_many_messages_is_said_in_plain_words(live: Live, page: Page) -> None:
    from sqlalchemy import create_engine

    from service.auth import create_key

    _row, secret = create_key(
        create_engine(live.db_url), name="site", public=True, origins=[live.base_url]
    )
    page.goto(f"{live.base_url}/demo?key={secret}")
    page.get_by_role("button", name="Open chat").click()
    box = page.get_by_label("Your message")
    box.fill("First question")
    box.press("Enter")
    expect(page.get_by_role("button", name="Good answer (message 1)")).to_be_visible()
    box.fill("Second, at once")
    box.press("Enter")
    alert = page.get_by_role("alert")
    expect(alert).to_have_text("Too many messages \u2014 try again in a minute.")
    expect(alert).to_have_attribute("title", re.compile(r"^HTTP 429: too many requests"))
    expect(box).to_have_value("Second, at once")  # kept, to send again later
    page.shots("rate-limited")


@pytest.fixture
def canary(live: Live, tiny_llama_dir: Path, tmp_path: Path) -> Iterator[Canary]:
    """A running experiment: one real LoRA adapter active, another as its candidate."""
    db = make_engine(Settings(database_url=live.db_url))
    lora = [make_adapter(tiny_llama_dir, tmp_path / f"lora{i}", seed=500 + i) for i in range(2)]
    yield Canary(live, Registry(db, tmp_path / "adapters"), lora)
    db.dispose()


@pytest.mark.parametrize(
    "settings_overrides",
    [
        {
            **KEYS_ON,
            "default_max_tokens": 8,
            "widget_compare_every": 1,  # every turn asks "which is better?"
            "canary_duel_share": 1.0,
        }
    ],
)
def test_the_compare_flow_works_unchanged_against_a_head_to_head(
    live: Live, page: Page, canary: Canary
) -> None:
    """While a canary runs, the server makes the widget's comparison a head-to-head (one answer
    from each arm); the widget shows and picks it as any comparison, without knowing which arm
    is which, and the pick is a win for one arm and a loss for the other."""
    from sqlalchemy import create_engine

    from service.auth import create_key

    exp = canary
    _row, secret = create_key(
        create_engine(live.db_url), name="site", public=True, origins=[live.base_url]
    )
    page.goto(f"{live.base_url}/demo?key={secret}")
    page.get_by_role("button", name="Open chat").click()
    page.get_by_label("Your message").fill("Which one?")
    page.get_by_label("Your message").press("Enter")
    expect(page.get_by_role("button", name="Answer B is better (message 1)")).to_be_visible()
    page.shots("head-to-head")
    assert exp.candidate not in page.locator("[data-prefloop-widget]").inner_html()
    page.get_by_role("button", name="Answer B is better (message 1)").click()
    expect(page.get_by_text("Thanks — you picked B.")).to_be_visible()
    [pick] = wait_for(lambda: feedback(live, kind="pick"), "the pick")
    [duel] = completions(live)
    assert duel.experiment_id == exp.id and pick.completion_id == duel.id and duel.stream
    with live.session() as s:
        b = s.exec(
            select(Message).where(Message.completion_id == duel.id, Message.choice_index == 1)
        ).one()
        a = s.exec(
            select(Message).where(Message.completion_id == duel.id, Message.choice_index == 0)
        ).one()
    assert {a.adapter_version, b.adapter_version} == {exp.candidate, exp.incumbent}
    arms = exp.arms()
    winner = "candidate" if b.adapter_version == exp.candidate else "incumbent"
    loser = {"candidate": "incumbent", "incumbent": "candidate"}[winner]
    assert (arms[winner]["won"], arms[winner]["lost"]) == (1, 0)
    assert (arms[loser]["won"], arms[loser]["lost"]) == (0, 1)
