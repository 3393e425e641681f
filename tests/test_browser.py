"""The chat page in headless Chromium (Debian's /usr/bin/chromium, never a downloaded browser).

Each test drives the real page against a live fake-engine server on 127.0.0.1 (with its own SQLite database);
one browser serves the whole module and every test gets a fresh context (so fresh local and session storage).
Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from llm.conversation.turns import Turn
from llm.errors import Overloaded
from llm.web.auth import ANON_COOKIE, ANON_PREFIX, anonymous_cookie
from tests.conftest import TEST_PERSONALITIES, LiveServer

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


def browser_context(browser, server, **options):
    """A fresh browser context (own storage) pointed at a live server; page errors fail the test. It starts with
    an anonymous identity of its own (as its first page load would give it), known to the test as ``user``."""
    context = browser.new_context(viewport=DESKTOP, base_url=server.url, **options)
    ident = secrets.token_hex(16)
    with server.app.app_context():
        context.anonymous_cookie = anonymous_cookie(ident)
    context.add_cookies([{"name": ANON_COOKIE, "value": context.anonymous_cookie, "url": server.url,
                          "httpOnly": True, "sameSite": "Strict"}])
    context.user = ANON_PREFIX + ident
    context.page_errors = []
    context.on("weberror", lambda error: context.page_errors.append(f"{error.error} {error.error.stack}"))
    yield context
    context.close()
    assert context.page_errors == []


@pytest.fixture
def context(browser, live_fake):
    yield from browser_context(browser, live_fake)


@pytest.fixture
def keyed_server(make_app):
    """A live server that wants an API key: "secret", which names the user alice."""
    server = LiveServer(make_app(LLM_API_KEYS="alice:secret"))
    yield server
    server.close()


@pytest.fixture
def keyed_context(browser, keyed_server):
    yield from browser_context(browser, keyed_server)


@pytest.fixture
def cache_key(live_fake, context):
    """The engine's cache key (the internal id) of one of the browser's conversations."""
    return lambda cid: live_fake.app.extensions["llm"].store.get(cid, context.user).key


@pytest.fixture
def client(client, context):
    """The Flask test client as the browser: the same anonymous identity."""
    client.set_cookie(ANON_COOKIE, context.anonymous_cookie, domain="localhost")
    return client


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


def history_items(page):
    """The conversations listed in the sidebar, newest first."""
    return page.locator("#history-list > li")


def listed(page, title):
    return history_items(page).filter(has_text=title)


def open_listed(page, title):
    """Open a conversation from the sidebar and wait until its socket is bound."""
    listed(page, title).locator(".conversation-open").click()
    wait_connected(page)


def new_conversation(page):
    page.get_by_role("button", name="New conversation").click()
    wait_connected(page)


def seed(server, user, conversations):
    """Store finished conversations of ``user`` directly: (id, personality, question, seconds ago)."""
    store = server.app.extensions["llm"].store
    for ident, personality, question, age in conversations:
        conversation = store.open(ident, personality, user)
        store.append(conversation, [Turn("user", question), Turn("assistant", f"An answer to: {question}")])
        with store.db.transaction() as cursor:
            cursor.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time() - age, conversation.key))


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


def test_answer_streams_in_as_markdown(page, fake_engine, cache_key):
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
    expect(page.locator("#announcer")).to_have_text("Answer finished.")
    request = fake_engine.requests[-1]
    assert request.messages[-1]["content"] == "Hi"
    assert request.conversation == cache_key(conversation_id(page))


def test_screen_readers_hear_the_answer_a_sentence_at_a_time_as_it_streams(page, fake_engine):
    fake_engine.delay = 0.1
    fake_engine.script(["The **first** sentence.", " Then", " a", " second", " one.", *[f" w{i}" for i in range(15)]])
    ask(page, "Hi")
    live = page.locator("#answer-live")
    expect(live).to_have_attribute("aria-live", "polite")
    expect(live.locator("p").first).to_have_text("The first sentence.")  # read while the answer still streams
    expect(answers(page).last).to_have_attribute("aria-busy", "true")
    finished_answer(page)
    assert live.locator("p").all_inner_texts() == ["The first sentence.", "Then a second one.",
                                                  " ".join(f"w{i}" for i in range(15))]
    expect(page.locator("#announcer")).to_have_text("Answer finished.")


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
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
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


def test_reload_restores_history_then_continues_it(context, page, fake_engine, cache_key):
    fake_engine.script(["Remembered **this**."])
    ask(page, "Remember me")
    finished_answer(page)
    first_id = conversation_id(page)
    page.reload()
    wait_connected(page)
    expect(page.locator("article.message.user .body")).to_have_text("Remember me")
    expect(answers(page).locator("strong")).to_have_text("this")
    expect(page.get_by_role("button", name="Copy answer")).to_have_count(1)

    ask(page, "And now?")
    finished_answer(page)
    request = fake_engine.requests[-1]
    assert request.conversation == cache_key(first_id) and first_id == conversation_id(page)
    assert [m["content"] for m in request.messages[1:]] == ["Remember me", "Remembered **this**.", "And now?"]



def test_regenerate_replaces_the_answer_and_keeps_each_version(page, fake_engine):
    ask(page, "Question")
    finished_answer(page)
    fake_engine.script(["A second opinion."])
    page.get_by_role("button", name="Regenerate").click()  # the last answer again, not a new turn
    expect(finished_answer(page).locator(".body")).to_have_text("A second opinion.")
    assert [m["content"] for m in fake_engine.requests[-1].messages[1:]] == ["Question"]
    expect(answers(page)).to_have_count(1)
    expect(page.locator("article.message.user")).to_have_count(1)
    versions = answers(page).last.get_by_role("group", name="Versions of this answer")
    expect(versions).to_contain_text("2/2")
    versions.get_by_role("button", name="Previous version of this answer").click()
    expect(answers(page).last.locator(".body")).to_have_text("Hello from the fake engine.")
    expect(answers(page).last.get_by_role("group", name="Versions of this answer")).to_contain_text("1/2")
    ask(page, "Follow-up")  # the conversation goes on from the version shown
    finished_answer(page)
    assert [m["content"] for m in fake_engine.requests[-1].messages[1:]] == [
        "Question", "Hello from the fake engine.", "Follow-up"]
    page.reload()
    wait_connected(page)
    expect(answers(page).first.get_by_role("group", name="Versions of this answer")).to_contain_text("1/2")


def test_edit_a_question_and_go_back_to_the_earlier_branch(page, fake_engine):
    fake_engine.script(["About cats."])
    ask(page, "Tell me about cats")
    finished_answer(page)
    ask(page, "And their whiskers?")
    finished_answer(page)
    question = page.locator("article.message.user").first
    question.get_by_role("button", name="Edit this question").click()
    box = question.get_by_label("Edited question")
    expect(box).to_be_focused()
    expect(box).to_have_value("Tell me about cats")
    box.fill("Tell me about dogs")
    fake_engine.script(["About dogs."])
    box.press("Enter")
    expect(finished_answer(page).locator(".body")).to_have_text("About dogs.")
    assert [m["content"] for m in fake_engine.requests[-1].messages[1:]] == ["Tell me about dogs"]
    expect(page.locator("article.message.user")).to_have_count(1)
    versions = page.locator("article.message.user").first.get_by_role("group", name="Versions of this question")
    expect(versions).to_contain_text("2/2")
    shot(page, "edited-question-desktop.png")
    versions.get_by_role("button", name="Previous version of this question").click()
    expect(page.locator("article.message.user")).to_have_count(2)  # the whole earlier branch is back
    expect(answers(page).first.locator(".body")).to_have_text("About cats.")
    expect(page.locator("article.message.user").last).to_contain_text("And their whiskers?")


def test_shortcuts_are_listed_and_work(page, fake_engine):
    page.get_by_label("Message", exact=True).press("?")  # typed there, it is just a question mark
    expect(page.get_by_role("dialog")).to_have_count(0)
    page.evaluate("document.activeElement.blur()")
    page.keyboard.press("?")
    dialog = page.get_by_role("dialog", name="Keyboard shortcuts")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("New conversation")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    page.get_by_role("button", name="Shortcuts").click()
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Close").click()
    page.evaluate("document.activeElement.blur()")
    page.keyboard.press("/")
    expect(page.get_by_label("Message", exact=True)).to_be_focused()
    expect(page.get_by_label("Message", exact=True)).to_have_value("?")
    ask(page, "Before")
    finished_answer(page)
    first = conversation_id(page)
    page.keyboard.press("Control+Shift+O")
    expect(page.locator("article.message.user")).to_have_count(0)
    assert conversation_id(page) != first


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


def test_new_conversation_clears_and_starts_afresh(page, fake_engine, cache_key):
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
    assert fake_engine.requests[-1].conversation == cache_key(new_id)
    assert [m["content"] for m in fake_engine.requests[-1].messages[1:]] == ["Fresh"]


def test_busy_server_shows_a_readable_message(page, fake_engine):
    fake_engine.script(Overloaded())
    ask(page, "Hi")
    answer = finished_answer(page)
    expect(answer.get_by_role("alert")).to_have_text(
        "The server is busy right now. Please try again in a few seconds.")
    expect(answer.get_by_role("button", name="Good answer")).to_have_count(0)  # nothing was stored to rate
    shot(page, "busy-desktop.png")
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
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
    expect(page.locator("article.message.user .body")).to_have_text("Hi greedy")


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
                {"type": "source", "title": "guide.pdf, page 2", "number": 1,
                 "url": "/knowledge/bases/3/documents/7/file#page=2"},
                {"type": "token", "text": "From the "}, {"type": "token", "text": "page [1]."}]

    context.route_web_socket("**/gpt-socket/**", lambda route: scripted_server(route, frames))
    page = open_chat(context)
    ask(page, "https://example.com/page what does it say?")
    answer = finished_answer(page)
    expect(answer.get_by_role("link", name="Example page")).to_have_attribute("href", "https://example.com/page")
    expect(answer.locator(".sources")).to_contain_text("Sneaky")
    expect(answer.get_by_role("link", name="[1] guide.pdf, page 2")).to_have_attribute(  # a cited document
        "href", "/knowledge/bases/3/documents/7/file#page=2")
    assert answer.locator(".sources a").count() == 2
    expect(answer.locator(".status-notes")).to_contain_text("Fetching https://example.com/page")
    expect(answer.locator(".meta")).to_contain_text("2 tokens · 12.5 tokens/s")
    expect(answer.locator(".trimmed")).to_have_text("4 earlier messages were left out to fit the model's context.")
    expect(answer.get_by_role("group", name="Rate this answer")).to_have_count(0)  # its end frame had no message_id


def test_dropped_socket_reconnects_rebinds_and_resumes_the_answer(context, fake_engine, cache_key):
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
    routes[-1].close(code=1001, reason="going away")  # as when a proxy drops the connection
    expect(page.locator("#banner")).to_contain_text("Reconnecting in 1 second")
    shot(page, "reconnecting-desktop.png")
    answer = finished_answer(page)
    assert answer.locator(".body").inner_text().split() == [word.strip() for word in LONG]  # all, once each
    expect(answer.get_by_role("alert")).to_have_count(0)
    wait_connected(page)
    expect(page.locator("#banner")).to_be_hidden()
    assert len(routes) == 2 and "resume=" in routes[-1].url
    assert len(fake_engine.requests) == 2  # the answer was generated once

    fake_engine.delay = 0
    ask(page, "After the drop")
    finished_answer(page)
    request = fake_engine.requests[-1]
    assert request.conversation == cache_key(first_id)
    assert [m["content"] for m in request.messages[1:3]] == ["Before the drop", "Hello from the fake engine."]


class Network:
    """The browser's network to the server: a TCP relay on 127.0.0.1 that can be cut (every connection reset, new
    ones refused) and restored, with the browser told it is offline meanwhile, as a phone that loses Wi-Fi is."""

    def __init__(self, context, target: tuple[str, int]):
        self.context, self.target = context, target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.up = True
        self.connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self.connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.up = False
        self.context.set_offline(True)
        with self._lock:
            connections, self.connections = self.connections, []
        for connection in connections:  # shut down first: that wakes the relay's threads blocked on them
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def restore(self):
        self.up = True
        self.context.set_offline(False)

    def close(self):
        self.cut()
        self.listener.close()


@pytest.fixture
def network(browser, live_fake):
    """A browser context whose every connection to the live server goes through a ``Network`` it can cut."""
    host, port = live_fake.url.removeprefix("http://").split(":")
    context = next(contexts := browser_context(browser, live_fake))
    network = Network(context, (host, int(port)))
    yield network
    network.close()
    next(contexts, None)


def test_an_answer_survives_a_network_cut_and_resumes_where_it_was(network, fake_engine):
    page = open_chat(network.context, f"{network.url}/")
    fake_engine.delay = 0.25  # 6 s in all: the cut comes well before the end, even on a busy machine
    fake_engine.script(LONG)
    ask(page, "Talk a lot")
    expect(answers(page).last).to_contain_text("w1")
    network.cut()  # the phone locks, the Wi-Fi changes...
    expect(page.locator("#connection")).to_have_attribute("data-state", "down")
    expect(answers(page).last).to_contain_text("the answer goes on at the server")
    time.sleep(1)  # meanwhile the server goes on generating
    network.restore()
    answer = finished_answer(page)
    assert answer.locator(".body").inner_text().split() == [word.strip() for word in LONG]  # nothing lost or twice
    expect(answer.get_by_role("alert")).to_have_count(0)
    assert len(fake_engine.requests) == 1 and not fake_engine.cancelled.is_set()


def test_stop_pressed_while_offline_stops_the_answer_once_back(network, fake_engine):
    page = open_chat(network.context, f"{network.url}/")
    fake_engine.delay = 0.3
    fake_engine.script(LONG)
    ask(page, "Talk a lot")
    expect(answers(page).last).to_contain_text("w1")
    network.cut()
    expect(page.locator("#connection")).to_have_attribute("data-state", "down")
    page.get_by_role("button", name="Stop").click()
    network.restore()
    answer = finished_answer(page)
    expect(answer).to_contain_text("Stopped")
    assert fake_engine.cancelled.wait(30) and "w23" not in answer.locator(".body").inner_text()


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


def test_sidebar_lists_conversations_and_opens_older_ones(page, fake_engine, cache_key):
    expect(page.locator("#history-status")).to_contain_text("No conversations yet")
    ask(page, "First topic")
    finished_answer(page)
    first_id = conversation_id(page)
    first = listed(page, "First topic")
    expect(first.locator(".conversation-open")).to_have_attribute("aria-current", "true")
    expect(first.locator(".conversation-meta")).to_have_text("greedy · just now")

    new_conversation(page)
    ask(page, "Second topic")
    finished_answer(page)
    expect(history_items(page)).to_have_count(2)
    expect(history_items(page).first).to_contain_text("Second topic")  # a new conversation joins at the top
    expect(first.locator(".conversation-open")).not_to_have_attribute("aria-current", "true")

    page.get_by_label("Personality").select_option("other")
    wait_connected(page)
    ask(page, "Other topic")
    finished_answer(page)
    page.get_by_label("Personality").select_option("greedy")
    expect(page.locator("article.message.user .body")).to_have_text("Second topic")

    open_listed(page, "Other topic")  # switches the personality to the conversation's own
    expect(page.get_by_label("Personality")).to_have_value("other")
    expect(page.locator("article.intro")).to_have_text("Other intro.")
    expect(page.locator("article.message.user .body")).to_have_text("Other topic")

    open_listed(page, "First topic")
    expect(page.get_by_label("Personality")).to_have_value("greedy")
    expect(page.locator("article.message.user .body")).to_have_text("First topic")
    expect(answers(page)).to_have_count(1)
    expect(first.locator(".conversation-open")).to_have_attribute("aria-current", "true")
    assert conversation_id(page) == first_id
    ask(page, "Follow-up")
    finished_answer(page)
    request = fake_engine.requests[-1]
    assert request.conversation == cache_key(first_id)
    assert [m["content"] for m in request.messages[1:]] == ["First topic", "Hello from the fake engine.", "Follow-up"]
    expect(history_items(page).first).to_contain_text("First topic")  # the latest answer moves it up


def test_rename_and_delete_conversations(page, client):
    ask(page, "Alpha question")
    finished_answer(page)
    alpha_id = conversation_id(page)
    new_conversation(page)
    ask(page, "Beta question")
    finished_answer(page)
    beta_id = conversation_id(page)
    expect(history_items(page)).to_have_count(2)

    actions = page.get_by_role("button", name="Actions for “Alpha question”")
    expect(actions).to_have_attribute("aria-expanded", "false")
    actions.click()
    expect(actions).to_have_attribute("aria-expanded", "true")
    expect(page.get_by_role("link", name="Export as Markdown")).to_have_attribute(
        "href", f"/conversations/{alpha_id}/export?format=md")
    expect(page.get_by_role("link", name="Export as JSON")).to_have_attribute(
        "href", f"/conversations/{alpha_id}/export?format=json")
    page.get_by_role("button", name="Rename").click()
    title = page.get_by_label("Conversation title")
    expect(title).to_be_focused()
    expect(title).to_have_value("Alpha question")
    title.press("Escape")  # cancels; focus goes back to the conversation
    expect(title).to_have_count(0)
    expect(listed(page, "Alpha question").locator(".conversation-open")).to_be_focused()

    page.keyboard.press("Tab")  # to its actions button, then the same again by keyboard only
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(title).to_be_focused()
    page.keyboard.type("Renamed alpha")  # replaces the selected title
    page.keyboard.press("Enter")
    expect(listed(page, "Renamed alpha")).to_have_count(1)
    expect(page.get_by_role("button", name="Actions for “Renamed alpha”")).to_be_visible()
    assert client.get(f"/conversations/{alpha_id}").get_json()["title"] == "Renamed alpha"

    page.get_by_role("button", name="Actions for “Beta question”").click()
    page.get_by_role("button", name="Delete…").click()
    expect(page.get_by_role("group", name="Delete this conversation? This cannot be undone.")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel")).to_be_focused()
    page.get_by_role("button", name="Delete", exact=True).click()
    expect(history_items(page)).to_have_count(1)
    expect(history_items(page)).to_contain_text("Renamed alpha")
    expect(listed(page, "Renamed alpha").locator(".conversation-open")).to_be_focused()
    assert client.get(f"/conversations/{beta_id}").status_code == 404
    # The open conversation was the deleted one: the page starts a new one.
    expect(page.locator("article.message.user")).to_have_count(0)
    wait_connected(page)
    assert conversation_id(page) not in (alpha_id, beta_id)
    listed_ids = [c["id"] for c in client.get("/conversations").get_json()["conversations"] if c["messages"]]
    assert listed_ids == [alpha_id]


def test_history_pages_with_load_more(live_fake, context):
    seed(live_fake, context.user, [(f"seed{i:02d}", "greedy", f"Seeded question {i}", 1000 - i) for i in range(22)])
    context.add_init_script(  # about:blank runs it too, without storage
        "try { localStorage.setItem('llm.chat.conversation.greedy', 'seed21'); } catch {}")
    page = open_chat(context)
    expect(page.locator("article.message.user .body")).to_have_text("Seeded question 21")
    expect(history_items(page)).to_have_count(20)
    expect(history_items(page).first.locator(".conversation-open")).to_have_attribute("aria-current", "true")
    expect(history_items(page).first.locator("time")).to_have_text("16 minutes ago")
    more = page.get_by_role("button", name="Load more")
    more.click()
    expect(history_items(page)).to_have_count(22)
    expect(history_items(page).last).to_contain_text("Seeded question 0")
    expect(more).to_be_hidden()
    expect(history_items(page).nth(20).locator(".conversation-open")).to_be_focused()


def test_feedback_with_comment_is_stored_and_restored(page, client):
    ask(page, "Rate me")
    answer = finished_answer(page)
    good, bad = answer.get_by_role("button", name="Good answer"), answer.get_by_role("button", name="Bad answer")
    expect(good).to_have_attribute("aria-pressed", "false")
    expect(bad).to_have_attribute("aria-pressed", "false")
    good.click()
    expect(good).to_have_attribute("aria-pressed", "true")
    answer.get_by_label("What was good? (optional)").fill("Short and correct.")
    shot(page, "feedback-desktop.png")
    answer.get_by_role("button", name="Send comment").click()
    expect(answer.locator(".feedback-thanks")).to_have_text("Thanks, your comment was sent.")
    expect(good).to_be_focused()

    conversation = client.get(f"/conversations/{conversation_id(page)}").get_json()
    turn = conversation["turns"][-1]
    assert turn["rating"] == 1
    rows = [json.loads(line) for line in client.get("/feedback/export").get_data(as_text=True).splitlines()]
    assert [(r["message_id"], r["rating"], r["comment"], r["question"]) for r in rows] == [
        (turn["id"], 1, "Short and correct.", "Rate me")]

    page.reload()
    wait_connected(page)
    answer = answers(page).last
    good, bad = answer.get_by_role("button", name="Good answer"), answer.get_by_role("button", name="Bad answer")
    expect(good).to_have_attribute("aria-pressed", "true")  # restored from the stored rating
    bad.click()
    expect(answer.get_by_label("What went wrong? (optional)")).to_be_visible()  # shown once it is stored
    expect(bad).to_have_attribute("aria-pressed", "true")
    expect(good).to_have_attribute("aria-pressed", "false")
    assert client.get(f"/conversations/{conversation_id(page)}").get_json()["turns"][-1]["rating"] == -1


def test_key_entered_once_is_an_httponly_cookie_used_everywhere(keyed_context, keyed_server, fake_engine):
    page = keyed_context.new_page()
    page.goto("/")
    key = page.get_by_label("API key", exact=True)
    key.fill("secret")
    key.press("Enter")
    expect(page.locator("#key-form")).to_be_hidden()
    wait_connected(page)
    cookie = next(c for c in keyed_context.cookies() if c["name"] == "llm_api_key")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # no script can read it
    assert "secret" not in page.url
    fake_engine.delay = 0.02
    fake_engine.script(["Streamed ", "with ", "a ", "key."])
    ask(page, "Keyed question")
    answer = finished_answer(page)
    expect(answer.locator(".body")).to_have_text("Streamed with a key.")
    expect(listed(page, "Keyed question")).to_have_count(1)
    answer.get_by_role("button", name="Good answer").click()
    expect(answer.get_by_label("What was good? (optional)")).to_be_visible()

    cid = conversation_id(page)
    page.get_by_role("button", name="Actions for “Keyed question”").click()
    with page.expect_download() as download:  # a plain link: the cookie authenticates it
        page.get_by_role("link", name="Export as Markdown").click()
    assert download.value.suggested_filename == f"conversation-{cid}.md"
    text = Path(download.value.path()).read_text()
    assert "## You\n\nKeyed question" in text and "Streamed with a key." in text
    client = keyed_server.app.test_client()
    assert client.get(f"/conversations/{cid}").status_code == 401
    stored = client.get(f"/conversations/{cid}", headers={"X-API-Key": "secret"}).get_json()
    assert stored["turns"][-1]["rating"] == 1


def test_key_form_asks_for_a_key_and_retries(keyed_context, keyed_server):
    page = keyed_context.new_page()
    page.goto("/static/index.html")  # GET / itself needs a key (see the xfail test below)
    key = page.get_by_label("API key", exact=True)
    expect(page.get_by_role("heading", name="API key needed")).to_be_visible()
    expect(key).to_be_focused()
    expect(key).to_have_attribute("type", "password")
    key.fill("wrong")
    key.press("Enter")
    expect(page.get_by_role("alert").filter(has_text="That key was not accepted")).to_be_visible()
    expect(key).to_be_focused()
    expect(key).to_have_value("")
    shot(page, "api-key-desktop.png")
    key.fill("secret")
    key.press("Enter")
    expect(page.locator("#key-form")).to_be_hidden()
    wait_connected(page)
    ask(page, "Hello with a key")
    expect(finished_answer(page).locator(".body")).to_have_text("Hello from the fake engine.")
    expect(listed(page, "Hello with a key")).to_have_count(1)
    owned = keyed_server.app.extensions["llm"].store.list("alice")
    assert [c["title"] for c in owned if c["messages"]] == ["Hello with a key"]


def test_page_without_a_key_in_its_url_asks_for_one(keyed_context):
    page = keyed_context.new_page()
    page.goto("/")
    expect(page.get_by_label("API key", exact=True)).to_be_visible(timeout=2000)


def test_layout_desktop_and_phone(live_fake, context, fake_engine):
    seed(live_fake, context.user, [
        ("lisbon", "greedy", "Plan a relaxed weekend in Lisbon with a small budget", 2 * 3600),
        ("wal", "greedy", "Explain SQLite WAL mode", 26 * 3600),
        ("poem", "other", "A birthday poem for Sam", 4 * 86400),
        ("report", "greedy", "Summarise the Q3 report", 30 * 86400)])
    page = open_chat(context)
    fake_engine.script(["Hello! I can help with Python, writing and more."])
    ask(page, "Hello there")
    finished_answer(page).get_by_role("button", name="Good answer").click()
    fake_engine.script([RICH_ANSWER])
    ask(page, "How do I reverse a list in Python? Show me a few ways, with a short example.")
    finished_answer(page)
    expect(history_items(page)).to_have_count(5)
    page.get_by_role("button", name="Actions for “Explain SQLite WAL mode”").click()
    page.get_by_role("button", name="Add context").click()
    page.get_by_label("Context for your next message").fill("I use Python 3.12.")
    page.get_by_label("Message", exact=True).fill("And for a tuple?")
    page.get_by_label("Message", exact=True).blur()
    shot(page, "chat-desktop.png")
    page.emulate_media(color_scheme="dark")
    shot(page, "chat-desktop-dark.png")
    page.emulate_media(color_scheme="light")
    toggle = page.get_by_role("button", name="Conversations", exact=True)
    expect(toggle).to_be_hidden()  # the sidebar is always shown on wide screens
    for size, name in ((PHONE, "chat-phone.png"), ({"width": 360, "height": 740}, None)):
        page.set_viewport_size(size)
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        assert_no_horizontal_scroll(page, size)
        send = page.get_by_role("button", name="Send", exact=True).bounding_box()
        assert send["x"] + send["width"] <= size["width"]
        expect(page.get_by_role("navigation", name="Conversations")).to_be_hidden()
        if name:
            shot(page, name)

    page.set_viewport_size(PHONE)
    expect(toggle).to_have_attribute("aria-expanded", "false")
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    nav = page.get_by_role("navigation", name="Conversations")
    expect(nav).to_be_visible()
    current = listed(page, "Hello there").locator(".conversation-open")
    expect(current).to_be_focused()
    expect(current).to_have_attribute("aria-current", "true")
    page.wait_for_timeout(250)  # the slide-in transition
    assert_no_horizontal_scroll(page, PHONE)
    shot(page, "chat-phone-sidebar.png")
    page.keyboard.press("Escape")
    expect(nav).to_be_hidden()
    expect(toggle).to_be_focused()
    expect(toggle).to_have_attribute("aria-expanded", "false")

    toggle.click()  # opening a conversation from the drawer closes it
    open_listed(page, "Explain SQLite WAL mode")
    expect(nav).to_be_hidden()
    expect(page.locator("article.message.user .body")).to_have_text("Explain SQLite WAL mode")


def assert_no_horizontal_scroll(page, size):
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"horizontal scroll of {overflow}px at {size['width']}px wide"


def test_each_browser_sees_only_its_own_history(browser, live_fake, page, fake_engine):
    """Without API keys, strangers on one service never see each other's conversations in the sidebar."""
    ask(page, "My private question")
    finished_answer(page)
    expect(listed(page, "My private question")).to_have_count(1)
    stranger = browser.new_context(viewport=DESKTOP, base_url=live_fake.url)  # no cookie: the page gives one
    try:
        other = open_chat(stranger)
        expect(history_items(other)).to_have_count(0)
        ask(other, "The stranger's question")
        finished_answer(other)
        expect(listed(other, "The stranger's question")).to_have_count(1)
        expect(listed(other, "My private question")).to_have_count(0)
        assert any(c["name"] == ANON_COOKIE and c["httpOnly"] for c in stranger.cookies())
    finally:
        stranger.close()
    page.reload()
    wait_connected(page)
    expect(listed(page, "My private question")).to_have_count(1)
    expect(listed(page, "The stranger's question")).to_have_count(0)


def test_theme_follows_the_system_and_the_button_cycles_light_dark_system(browser, live_fake):
    dark_bg, light_bg = "rgb(17, 20, 24)", "rgb(245, 246, 248)"
    context = browser.new_context(viewport=DESKTOP, base_url=live_fake.url, color_scheme="dark")
    try:
        page = open_chat(context)
        body = page.locator("body")
        expect(body).to_have_css("background-color", dark_bg)  # the system's scheme by default
        button = page.get_by_role("button", name="Theme: as the system")
        button.click()
        expect(page.get_by_role("button", name="Theme: light")).to_be_visible()
        expect(body).to_have_css("background-color", light_bg)
        page.reload()
        wait_connected(page)
        expect(body).to_have_css("background-color", light_bg)  # the choice is kept
        page.get_by_role("button", name="Theme: light").click()
        expect(body).to_have_css("background-color", dark_bg)
        page.get_by_role("button", name="Theme: dark").click()
        expect(page.get_by_role("button", name="Theme: as the system")).to_be_visible()
        page.emulate_media(color_scheme="light")
        expect(body).to_have_css("background-color", light_bg)  # following the system again
    finally:
        context.close()


def test_search_narrows_the_sidebar_to_matching_conversations(live_fake, context):
    seed(live_fake, context.user, [
        ("lisbon", "greedy", "Plan a relaxed weekend in Lisbon", 2 * 3600),
        ("wal", "greedy", "Explain SQLite WAL mode", 26 * 3600),
        ("poem", "other", "A birthday poem for Sam", 4 * 86400)])
    page = open_chat(context)
    expect(history_items(page)).to_have_count(3)
    search = page.get_by_role("searchbox", name="Search conversations")
    search.fill("LISBON")
    expect(history_items(page)).to_have_count(1)
    expect(listed(page, "Plan a relaxed weekend in Lisbon")).to_have_count(1)
    search.fill("An answer to: A birthday")  # answers are searched too
    expect(history_items(page)).to_have_count(1)
    expect(listed(page, "A birthday poem for Sam")).to_have_count(1)
    search.fill("nothing of the sort")
    expect(history_items(page)).to_have_count(0)
    expect(page.locator("#history-status")).to_have_text("No conversation matches your search.")
    search.fill("")
    expect(history_items(page)).to_have_count(3)


def test_code_is_highlighted_and_each_block_has_a_copy_button(page, fake_engine):
    fake_engine.script(["Try this:\n\n```python\ndef greet(name):\n    return f'hi {name}'  # friendly\n```\n\n",
                        "```\nplain text block\n```"])
    ask(page, "Show me a function")
    answer = finished_answer(page)
    python = answer.locator("pre code.language-python")
    expect(python.locator("span.hljs-keyword").first).to_have_text("def")
    expect(python.locator("span.hljs-comment")).to_have_text("# friendly")
    expect(answer.locator("pre")).to_have_count(2)
    expect(answer.get_by_role("button", name="Copy code")).to_have_count(2)  # unknown language: plain, still copyable
    expect(answer.locator("pre").nth(1).locator("span")).to_have_count(0)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    answer.get_by_role("button", name="Copy code").first.click()
    expect(answer.get_by_role("button", name="Copy code").first).to_have_text("Copied")
    assert "def greet(name):" in page.evaluate("navigator.clipboard.readText()")


AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"


def audit(page, view: str) -> None:
    """axe-core (vendored) on the page as it is now: no serious or critical violation (WCAG 2.x A and AA rules,
    contrast included)."""
    if not page.evaluate("typeof window.axe === 'object'"):
        page.add_script_tag(path=str(AXE))
    checked, result = page.evaluate("""async () => {
        const { violations, passes } = await axe.run(document);
        return [passes.length, violations.filter((v) => v.impact === 'serious' || v.impact === 'critical')
            .map((v) => ({ id: v.id, impact: v.impact, help: v.help,
                           nodes: v.nodes.slice(0, 5).map((n) => n.target.join(' ') + ': ' + n.failureSummary) }))];
    }""")
    assert checked > 10, f"{view}: axe-core checked almost nothing"
    assert result == [], f"{view}: {json.dumps(result, indent=2)}"


@pytest.fixture
def audited(browser, live_fake):
    """A context where the audit may inject axe-core (the page's CSP rightly forbids inline scripts)."""
    yield from browser_context(browser, live_fake, bypass_csp=True)


def test_every_view_passes_an_accessibility_audit(live_fake, audited, fake_engine):
    context = audited
    seed(live_fake, context.user, [("wal", "greedy", "Explain SQLite WAL mode", 3600)])
    page = open_chat(context)
    audit(page, "new conversation")
    fake_engine.script([RICH_ANSWER])
    ask(page, "How do I reverse a list?")
    finished_answer(page)
    fake_engine.script(["Another way."])
    page.get_by_role("button", name="Regenerate").click()
    expect(finished_answer(page).get_by_role("group", name="Versions of this answer")).to_be_visible()
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        audit(page, f"answered, with versions ({scheme})")
    page.emulate_media(color_scheme="light")
    page.get_by_role("button", name="Actions for “Explain SQLite WAL mode”").click()
    audit(page, "conversation actions menu")
    page.keyboard.press("Escape")
    page.locator("article.message.user").first.get_by_role("button", name="Edit this question").click()
    audit(page, "editing a question")
    page.get_by_role("button", name="Cancel").click()
    page.get_by_role("button", name="Shortcuts").click()
    audit(page, "shortcuts dialog")
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Documents").click()
    page.get_by_role("button", name="Choose files").wait_for()
    audit(page, "documents dialog")
    page.keyboard.press("Escape")
    page.set_viewport_size(PHONE)
    audit(page, "phone")
    page.get_by_role("button", name="Conversations", exact=True).click()
    page.wait_for_timeout(250)  # the slide-in transition
    audit(page, "phone, conversations drawer")
    page.set_viewport_size(DESKTOP)
    for path in ("/chat", "/stats"):
        page.goto(path)
        page.wait_for_load_state("networkidle")
        audit(page, path)


def test_the_key_form_passes_an_accessibility_audit(browser, keyed_server):
    contexts = browser_context(browser, keyed_server, bypass_csp=True)
    page = next(contexts).new_page()
    page.goto("/static/index.html")
    expect(page.get_by_role("heading", name="API key needed")).to_be_visible()
    audit(page, "API key form")
    next(contexts, None)


def test_the_audit_catches_what_it_should(audited):
    page = open_chat(audited)
    page.evaluate("document.getElementById('messages').append(document.createElement('button'))")  # no name
    with pytest.raises(AssertionError, match="button-name"):
        audit(page, "a button without a name")


def test_a_french_browser_gets_the_page_in_french_and_can_switch(browser, live_fake, fake_engine):
    contexts = browser_context(browser, live_fake, locale="fr-CA")
    context = next(contexts)
    page = open_chat(context)
    expect(page.locator("html")).to_have_attribute("lang", "fr")
    expect(page.get_by_role("button", name="Envoyer")).to_be_visible()
    expect(page.get_by_label("Message", exact=True)).to_have_attribute("placeholder", "Posez votre question…")
    expect(page.locator("#connection")).to_contain_text("Connecté")
    expect(page.locator("#personality-info")).to_contain_text("contexte de 4 096 jetons")
    ask(page, "Bonjour")
    answer = finished_answer(page)
    expect(answer.locator(".meta")).to_contain_text("5 jetons")
    expect(answer.get_by_role("button", name="Copier la réponse")).to_be_visible()
    expect(page.locator("article.message.user").get_by_role("button", name="Modifier cette question")).to_be_visible()
    expect(page.locator("#history-list")).to_contain_text("à l’instant")
    shot(page, "chat-desktop-fr.png")
    page.emulate_media(color_scheme="dark")
    shot(page, "chat-desktop-fr-dark.png")
    page.emulate_media(color_scheme="light")
    page.set_viewport_size(PHONE)
    assert_no_horizontal_scroll(page, PHONE)
    shot(page, "chat-phone-fr.png")
    page.set_viewport_size(DESKTOP)

    page.get_by_role("button", name="EN: English, show the interface in English").click()
    expect(page.locator("html")).to_have_attribute("lang", "en")
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    expect(finished_answer(page).get_by_role("button", name="Copy answer")).to_be_visible()  # redrawn in English
    expect(page.locator("#history-list")).to_contain_text("just now")
    page.reload()  # the choice is kept
    wait_connected(page)
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    page.evaluate("localStorage.removeItem('llm.chat.language')")  # the browser's language again, on /stats too
    page.goto("/stats")
    expect(page.get_by_role("heading", name="Statistiques du service")).to_be_visible()
    expect(page.locator("#updated")).to_contain_text("Mis à jour à")
    next(contexts, None)


def test_a_personality_that_declares_french_speaks_french(browser, make_app, fake_engine, tmp_path):
    folder = tmp_path / "personalities"
    folder.mkdir()
    greedy = (TEST_PERSONALITIES / "greedy.toml").read_text()
    (folder / "greedy.toml").write_text(greedy)
    (folder / "francais.toml").write_text(greedy.replace('name = "greedy"', 'name = "francais"').replace(
        "[sampling]", 'language = "fr-CA"\n\n[sampling]'))
    server = LiveServer(make_app(LLM_PERSONALITIES_DIR=str(folder)))
    contexts = browser_context(browser, server)
    page = open_chat(next(contexts), "/chat/francais")
    expect(page.locator("html")).to_have_attribute("lang", "fr")
    expect(page.get_by_role("button", name="Envoyer")).to_be_visible()
    page.get_by_label("Personnalité").select_option("greedy")  # a personality that declares nothing: the browser's
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    next(contexts, None)
    server.close()


POLICY = b"# Holidays\n\nEmployees get 27 days of paid leave.\n\n# Expenses\n\nTaxi fares are refunded after 22:00.\n"


def test_documents_upload_with_status_per_file_and_cited_answers(context, live_fake, tmp_path):
    """Files chosen or dropped are uploaded one by one with their verdicts; answers then cite their passages."""
    (tmp_path / "policy.md").write_bytes(POLICY)
    (tmp_path / "tool.exe").write_bytes(b"MZ\x00\x01binary")
    page = open_chat(context)
    page.get_by_role("button", name="Documents").click()
    dialog = page.get_by_role("dialog", name="Your documents")
    expect(dialog.get_by_text("No documents yet.")).to_be_visible()
    dialog.locator("#document-files").set_input_files([str(tmp_path / "policy.md"), str(tmp_path / "tool.exe")])
    uploads = dialog.locator(".upload")
    expect(uploads.nth(0)).to_have_attribute("data-state", "indexed")
    expect(uploads.nth(0)).to_contain_text("Indexed: 2 passages")
    expect(uploads.nth(1)).to_have_attribute("data-state", "refused")
    expect(uploads.nth(1)).to_contain_text("tool.exe is neither PDF")
    expect(dialog.get_by_role("link", name="policy.md")).to_be_visible()
    expect(dialog.locator("#knowledge-base")).to_have_text("My documents (1 document)")
    # A file dropped on the page (the dialog closed) opens the dialog and lands in the same base.
    page.keyboard.press("Escape")
    page.evaluate("""() => {
        const data = new DataTransfer();
        data.items.add(new File(['Visitors park on level 2.'], 'parking.txt', { type: 'text/plain' }));
        document.querySelector('main').dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true }));
    }""")
    expect(dialog.locator(".upload").last).to_have_attribute("data-state", "indexed")
    expect(dialog.get_by_role("link", name="parking.txt")).to_be_visible()
    shot(page, "documents.png")
    page.keyboard.press("Escape")
    ask(page, "Are taxi fares refunded?")
    answer = finished_answer(page)
    link = answer.get_by_role("link", name="[1] policy.md, Expenses")
    expect(link).to_have_attribute("href", re.compile(r"^/knowledge/bases/\d+/documents/\d+/file$"))
    document = context.request.get(link.get_attribute("href"))  # the browser's cookie opens its own document
    assert document.ok and document.body() == POLICY
