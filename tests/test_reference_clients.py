"""The reference design's later clients, with our own client code written from their contract: a socket per
prompt, ``<END session-id>`` end frames, ``|SESSION|``/``|CONTENT|``/``|RAG|`` markers, ``/describe`` and ``/chat``."""

from __future__ import annotations

import datetime

import pytest
import websocket

from llm.conversation.service import date_line
from llm.conversation.turns import title_of


def ask_on_new_socket(server, message: str, query: str = "?end=session") -> tuple[str, str]:
    """One prompt on its own socket, as the reference page does; returns the answer and the session key."""
    ws = websocket.create_connection(f"{server.ws_url}/gpt-socket/greedy{query}", timeout=10)
    try:
        ws.send(message)
        text = ""
        while True:
            frame = ws.recv()
            if frame.startswith("<END "):
                return text, frame[5:-1]
            assert frame != "<END>", "a plain end frame in compatibility mode"
            text += frame
    finally:
        ws.close()


def test_socket_per_prompt_continues_through_the_end_frames_session_key(live_fake, fake_engine):
    fake_engine.script(["First answer."])
    first, key = ask_on_new_socket(live_fake, "Remember the word teal.")
    assert first == "First answer." and key
    second, again = ask_on_new_socket(live_fake, f"|SESSION|{key}|/SESSION|Which word?")
    assert again == key
    assert [m["content"] for m in fake_engine.requests[-1].messages[1:]] == [
        "Remember the word teal.", "First answer.", "Which word?"]


def test_compatibility_mode_as_a_setting_and_plain_end_still_the_default(make_app, fake_engine):
    from tests.conftest import LiveServer

    server = LiveServer(make_app(LLM_SOCKET_END_SESSION=True))
    try:
        _, key = ask_on_new_socket(server, "Hi", query="")
        assert key
        ws = websocket.create_connection(f"{server.ws_url}/gpt-socket/greedy?end=plain", timeout=10)
        ws.send("Hi")
        frames = [ws.recv()]
        while not frames[-1].startswith("<END"):
            frames.append(ws.recv())
        ws.close()
        assert frames[-1] == "<END>"
    finally:
        server.close()


def test_errors_also_end_with_a_session_key(live_fake):
    _, key = ask_on_new_socket(live_fake, "|CONTEXT|never closed")
    assert key


def test_content_block_is_context(live_fake, fake_engine):
    ask_on_new_socket(live_fake, "|CONTENT|The door code is 4512.|/CONTENT|What is the door code?")
    asked = fake_engine.requests[-1].messages[-1]["content"]
    assert "The door code is 4512." in asked and asked.endswith("What is the door code?")
    assert "|CONTENT|" not in asked


def test_rag_marker_says_search_is_not_configured_and_still_answers(live_fake, fake_engine):
    text, _ = ask_on_new_socket(live_fake, "|RAG|canada.ca|gc.ca|/RAG|How do I renew a passport?")
    assert "not configured" in text and "canada.ca, gc.ca" in text  # said where a plain client's user looks
    assert text.endswith("Hello from the fake engine.")
    assert fake_engine.requests[-1].messages[-1]["content"] == "How do I renew a passport?"


def test_describe_and_the_chat_directory(client):
    described = client.get("/describe/greedy").get_json()
    assert described["name"] == "greedy" and described["model"] and described["description"]
    assert "system_prompt" not in described
    assert client.get("/describe/nobody").status_code == 404
    directory = client.get("/chat").get_data(as_text=True)
    assert 'href="/chat/greedy"' in directory and 'href="/chat/other"' in directory
    page = client.get("/chat/greedy")
    assert page.status_code == 200 and b"/static/app.js" in page.data
    page.close()
    assert client.get("/chat/nobody").status_code == 404


def test_chat_page_is_open_like_the_main_page_but_the_directory_lists_data(make_app):
    keyed = make_app(LLM_API_KEYS="alice:k").test_client()
    response = keyed.get("/chat/greedy")
    assert response.status_code == 200  # the page asks for the key itself
    response.close()
    assert keyed.get("/describe/greedy").status_code == 401
    assert keyed.get("/chat").status_code == 401
    assert keyed.get("/chat", headers={"X-API-Key": "k"}).status_code == 200


@pytest.mark.parametrize("language, expected", [
    ("en", "(Today is Friday 04 December 2026.)"),
    ("fr", "(Nous sommes le vendredi 4 décembre 2026.)"),
    ("fr-CA", "(Nous sommes le vendredi 4 décembre 2026.)"),
    ("de", "(Today is Friday 04 December 2026.)"),
])
def test_date_line_speaks_the_personalitys_language(language, expected):
    assert date_line(datetime.date(2026, 12, 4), language) == expected


def test_titles_come_from_the_question_not_the_markup(client):
    client.get("/gpt/greedy", query_string={"prompt": "|CONTEXT|Our office is closed on Mondays.|/CONTEXT| "
                                                      "When is the office closed?", "session": "t-1"})
    assert client.get("/conversations/t-1").get_json()["title"] == "When is the office closed?"
    assert title_of("a " * 40).endswith("…") and len(title_of("a " * 40)) == 61
