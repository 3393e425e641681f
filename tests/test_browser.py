"""The chat page in headless Chromium (Debian's /usr/bin/chromium, never a downloaded browser).

Each test drives the real page against a live fake-engine server on 127.0.0.1; one browser serves the whole
module and every test gets a fresh context (so a fresh localStorage). Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llm.errors import Overloaded

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
LONG = [f"w{i} " for i in range(24)]  # the greedy personality's max_tokens is 24


MISSING = f"Chromium is missing at {CHROMIUM}: run `make browser-deps` to install it."


def test_chromium_is_installed():
    """Browser tests fail, never skip, without Chromium (the other tests then error in set-up)."""
    assert os.path.exists(CHROMIUM), MISSING


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(MISSING)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("The playwright package is missing: run `make install`.")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def context(browser, live_fake):
    """A fresh browser context (own storage) pointed at the live server; page errors fail the test."""
    context = browser.new_context(viewport=DESKTOP, base_url=live_fake.url)
    context.page_errors = []
    context.on("weberror", lambda error: context.page_errors.append(str(error.error)))
    yield context
    context.close()
    assert context.page_errors == []


@pytest.fixture
def page(context):
    return open_chat(context)


def open_chat(context, path="/"):
    """A new tab on the chat page, once it is connected (history restored first)."""
    page = context.new_page()
    page.goto(path)
    wait_connected(page)
    return page


def expect(*args, **kwargs):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(*args, **kwargs)


def wait_connected(page):
    expect(page.locator("#connection")).to_have_attribute("data-state", "open")


def ask(page, text):
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")


def answers(page):
    return page.locator("article.message.assistant:not(.intro)")


def finished_answer(page):
    """The last answer, once its end frame has arrived."""
    answer = answers(page).last
    expect(answer).not_to_have_attribute("aria-busy", "true")
    return answer


def conversation_id(page, personality="greedy"):
    return page.evaluate(f"localStorage.getItem('llm.chat.conversation.{personality}')")


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


def test_answer_streams_in_as_markdown(page, fake_engine):
    fake_engine.delay = 0.05
    fake_engine.script(["Hello", " **world**.", *[f" more{i}" for i in range(10)],
                        "\n\n```python\nprint('hi')\n```\n"])
    ask(page, "Hi")
    answer = answers(page).last
    expect(answer).to_have_attribute("aria-busy", "true")
    expect(answer.locator(".body")).to_contain_text("Hello world")  # visible while the answer still streams
    expect(answer).to_have_attribute("aria-busy", "true")
    answer = finished_answer(page)
    expect(answer.locator("strong")).to_have_text("world")
    expect(answer.locator("pre > code")).to_have_text("print('hi')\n")
    expect(answer.locator("pre > code")).to_have_class("language-python")
    expect(answer.locator(".meta")).to_contain_text("13 tokens")
    expect(page.locator("#announcer")).to_contain_text("Answer: Hello world.")
    request = fake_engine.requests[-1]
    assert request.messages[-1]["content"] == "Hi"
    assert request.conversation == conversation_id(page)


def test_keyboard_shift_enter_newline_enter_sends(page, fake_engine):
    prompt = page.get_by_label("Message", exact=True)
    prompt.focus()
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    page.keyboard.press("Enter")
    finished_answer(page)
    expect(page.locator("article.message.user .body")).to_have_text("line one\nline two")
    assert fake_engine.requests[-1].messages[-1]["content"] == "line one\nline two"
    expect(prompt).to_have_value("")
    expect(prompt).to_be_focused()


def test_stop_keeps_partial_answer_and_page_stays_usable(page, fake_engine):
    fake_engine.delay = 0.05
    fake_engine.script(LONG)
    ask(page, "Talk a lot")
    expect(answers(page).last).to_contain_text("w2")
    page.get_by_role("button", name="Stop").click()
    answer = finished_answer(page)
    assert fake_engine.cancelled.wait(5)
    text = answer.locator(".body").inner_text()
    assert "w0" in text and "w23" not in text
    expect(answer.locator(".meta")).to_contain_text("Stopped")
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    expect(page.get_by_role("button", name="Stop")).to_be_hidden()

    fake_engine.cancelled.clear()
    fake_engine.script(LONG)
    ask(page, "Again, at length")
    expect(answers(page).last).to_contain_text("w1")
    page.keyboard.press("Escape")
    expect(finished_answer(page).locator(".meta")).to_contain_text("Stopped")
    assert fake_engine.cancelled.wait(5)

    ask(page, "Still there?")
    expect(finished_answer(page).locator(".body")).to_have_text("Hello from the fake engine.")


def test_reload_restores_history_then_continues_it(context, page, fake_engine):
    fake_engine.script(["Remembered **this**."])
    ask(page, "Remember me")
    finished_answer(page)
    first_id = conversation_id(page)
    page.reload()
    wait_connected(page)
    expect(page.locator("article.message.user")).to_have_text("Remember me")
    expect(answers(page).locator("strong")).to_have_text("this")
    expect(page.get_by_role("button", name="Copy answer")).to_have_count(1)

    ask(page, "And now?")
    finished_answer(page)
    request = fake_engine.requests[-1]
    assert request.conversation == first_id == conversation_id(page)
    assert [m["content"] for m in request.messages[1:]] == ["Remember me", "Remembered **this**.", "And now?"]

    page.get_by_role("button", name="Regenerate").click()  # the last prompt again, as a new turn
    finished_answer(page)
    assert fake_engine.requests[-1].messages[-1]["content"] == "And now?"
    assert len(fake_engine.requests[-1].messages) == 6
    expect(answers(page)).to_have_count(3)


def test_model_output_cannot_run_script_or_inject_markup(page, fake_engine):
    fake_engine.script(['Hi <img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> ',
                        "[bad](javascript:alert(1)) [ok](https://example.com/) ![pic](https://example.com/p.png) ",
                        '<a href="https://evil.example/" onclick="window.__xss=3">raw</a>'])
    ask(page, "<b>not bold</b>")
    answer = finished_answer(page)
    for current in (page, open_chat(page.context)):  # live rendering, then the restored history
        answer = answers(current).last
        expect(answer.locator(".body")).to_contain_text("<script>window.__xss=2</script>")
        assert current.evaluate("typeof window.__xss") == "undefined"
        assert answer.locator("img, script, [onerror], [onclick], a[href^='javascript']").count() == 0
        assert current.locator("article.message.user b").count() == 0
        link = answer.get_by_role("link", name="ok")
        expect(link).to_have_attribute("target", "_blank")
        expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
        hrefs = [a.get_attribute("href") for a in answer.locator("a").all()]
        assert "https://example.com/p.png" in hrefs and all(href.startswith("https://") for href in hrefs)


def test_new_conversation_clears_and_starts_afresh(page, fake_engine):
    ask(page, "First")
    finished_answer(page)
    old_id = conversation_id(page)
    page.get_by_role("button", name="New conversation").click()
    expect(answers(page)).to_have_count(0)
    expect(page.locator("article.message.user")).to_have_count(0)
    expect(page.locator("article.intro")).to_have_text("Test intro.")
    expect(page.get_by_role("button", name="Regenerate")).to_be_hidden()
    wait_connected(page)
    ask(page, "Fresh")
    finished_answer(page)
    new_id = conversation_id(page)
    assert new_id != old_id
    assert fake_engine.requests[-1].conversation == new_id
    assert [m["content"] for m in fake_engine.requests[-1].messages[1:]] == ["Fresh"]


def test_busy_server_shows_a_readable_message(page, fake_engine):
    fake_engine.script(Overloaded())
    ask(page, "Hi")
    answer = finished_answer(page)
    expect(answer.get_by_role("alert")).to_have_text(
        "The server is busy right now. Please try again in a few seconds.")
    shot(page, "busy-desktop.png")
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    page.get_by_role("button", name="Regenerate").click()
    expect(finished_answer(page).locator(".body")).to_have_text("Hello from the fake engine.")


def test_personality_picker_describes_and_switches(page, fake_engine):
    info = page.locator("#personality-info")
    expect(info).to_contain_text("Deterministic test personality (greedy decoding).")
    expect(info).to_contain_text("Model: fake-model.gguf")
    expect(page.locator("article.intro")).to_have_text("Test intro.")
    ask(page, "Hi greedy")
    finished_answer(page)

    page.get_by_label("Personality").select_option("other")
    expect(info).to_contain_text("A second test personality.")
    expect(page.locator("article.intro")).to_have_text("Other intro.")
    expect(page.locator("article.message.user")).to_have_count(0)
    wait_connected(page)
    ask(page, "Hi other")
    finished_answer(page)
    assert fake_engine.requests[-1].messages[0]["content"].startswith("You are another test assistant.")
    assert conversation_id(page, "other") not in (None, conversation_id(page, "greedy"))

    page.get_by_label("Personality").select_option("greedy")  # each personality keeps its own conversation
    expect(page.locator("article.message.user")).to_have_text("Hi greedy")


def test_context_field_and_url_hint(page, fake_engine):
    expect(page.locator("#hint")).to_contain_text("Start with a URL")
    toggle = page.get_by_role("button", name="Add context")
    expect(toggle).to_have_attribute("aria-expanded", "false")
    toggle.click()
    page.get_by_label("Context for your next message").fill("The sky is green here.")
    ask(page, "What colour is the sky?")
    finished_answer(page)
    assert "The sky is green here." in fake_engine.requests[-1].messages[-1]["content"]
    user = page.locator("article.message.user").last
    expect(user.locator(".body")).to_have_text("What colour is the sky?")
    expect(user.locator("summary")).to_have_text("Context added")
    expect(page.get_by_label("Context for your next message")).to_be_hidden()


def scripted_server(route, frames_for_prompt):
    """Play the server's side of a routed websocket: a bind frame gets an end, a prompt its scripted frames."""

    def on_message(message):
        prompt = message.split("|/SESSION|", 1)[-1]
        if message == "|STOP|":
            return
        if not prompt:
            route.send(json.dumps({"type": "end", "conversation": "c1", "usage": None, "trimmed_turns": 0}))
            return
        for frame in frames_for_prompt(prompt):
            route.send(json.dumps(frame))
        route.send(json.dumps({"type": "end", "conversation": "c1", "finish_reason": "stop", "trimmed_turns": 4,
                               "usage": {"completion_tokens": 2, "tokens_per_second": 12.5}}))

    route.on_message(on_message)


def test_sources_status_and_trimmed_notice(context):
    def frames(prompt):
        return [{"type": "status", "message": "Fetching https://example.com/page"},
                {"type": "source", "title": "Example page", "url": "https://example.com/page"},
                {"type": "source", "title": "Sneaky", "url": "javascript:alert(1)"},
                {"type": "token", "text": "From the "}, {"type": "token", "text": "page."}]

    context.route_web_socket("**/gpt-socket/**", lambda route: scripted_server(route, frames))
    page = open_chat(context)
    ask(page, "https://example.com/page what does it say?")
    answer = finished_answer(page)
    expect(answer.get_by_role("link", name="Example page")).to_have_attribute("href", "https://example.com/page")
    expect(answer.locator(".sources")).to_contain_text("Sneaky")
    assert answer.locator(".sources a").count() == 1
    expect(answer.locator(".status-notes")).to_contain_text("Fetching https://example.com/page")
    expect(answer.locator(".meta")).to_contain_text("2 tokens · 12.5 tokens/s")
    expect(answer.locator(".trimmed")).to_have_text("4 earlier messages were left out to fit the model's context.")


def test_dropped_socket_reconnects_and_rebinds(context, fake_engine):
    routes = []

    def proxy(route):
        route.connect_to_server()
        routes.append(route)

    context.route_web_socket("**/gpt-socket/**", proxy)
    page = open_chat(context)
    ask(page, "Before the drop")
    finished_answer(page)
    first_id = conversation_id(page)

    fake_engine.delay = 0.05
    fake_engine.script(LONG)
    ask(page, "Talk a lot")
    expect(answers(page).last).to_contain_text("w1")
    routes[-1].close(code=1001, reason="going away")  # as when the server restarts
    answer = finished_answer(page)
    expect(answer.get_by_role("alert")).to_contain_text("connection was lost")
    expect(page.locator("#banner")).to_contain_text("Reconnecting in 1 second")
    shot(page, "reconnecting-desktop.png")
    wait_connected(page)
    expect(page.locator("#banner")).to_be_hidden()
    assert len(routes) == 2

    fake_engine.delay = 0
    ask(page, "After the drop")
    finished_answer(page)
    request = fake_engine.requests[-1]
    assert request.conversation == first_id
    assert [m["content"] for m in request.messages[1:3]] == ["Before the drop", "Hello from the fake engine."]


RICH_ANSWER = """## Three ways to reverse a list

1. **Slicing** makes a copy: `items[::-1]`
2. `reversed()` gives an iterator
3. `list.reverse()` works *in place*

```python
numbers = [1, 2, 3, 4, 5]
print(numbers[::-1])  # a deliberately long comment so that the code line is wider than any phone screen is
```

| Way | Copy? |
| --- | --- |
| slicing | yes |
| `reverse()` | no |

See https://docs.python.org/3/tutorial/datastructures.html#more-on-lists-and-a-very-long-fragment-name for more.
"""


def test_layout_desktop_and_phone(context, fake_engine):
    page = open_chat(context)
    fake_engine.script(["Hello! I can help with Python, writing and more."])
    ask(page, "Hello there")
    finished_answer(page)
    fake_engine.script([RICH_ANSWER])
    ask(page, "How do I reverse a list in Python? Show me a few ways, with a short example.")
    finished_answer(page)
    page.get_by_role("button", name="Add context").click()
    page.get_by_label("Context for your next message").fill("I use Python 3.12.")
    page.get_by_label("Message", exact=True).fill("And for a tuple?")
    page.get_by_label("Message", exact=True).blur()
    shot(page, "chat-desktop.png")
    page.emulate_media(color_scheme="dark")
    shot(page, "chat-desktop-dark.png")
    page.emulate_media(color_scheme="light")
    for size, name in ((PHONE, "chat-phone.png"), ({"width": 360, "height": 740}, None)):
        page.set_viewport_size(size)
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"horizontal scroll of {overflow}px at {size['width']}px wide"
        send = page.get_by_role("button", name="Send").bounding_box()
        assert send["x"] + send["width"] <= size["width"]
        if name:
            shot(page, name)
