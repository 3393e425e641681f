"""RAG through every endpoint: a leading URL adds the page, sources are reported, SSRF probes are refused
and the question is still answered."""

from __future__ import annotations

import json

import pytest
import websocket

from tests.conftest import LiveServer
from tests.rag_support import fixture_server


@pytest.fixture
def pages():
    with fixture_server() as server:
        yield server


@pytest.fixture
def rag_app(make_app):
    return make_app(LLM_UNSAFE_FETCH_ALLOW_LOOPBACK_FOR_TESTS=True)


def test_gpt_url_prompt_adds_page_and_reports_source(rag_app, fake_engine, pages):
    url = pages.url("/fixtures/main.html")
    response = rag_app.test_client().get("/gpt/greedy", query_string={"prompt": f"{url} What is this about?"})
    assert response.status_code == 200
    user = fake_engine.requests[-1].messages[-1]["content"]
    assert user.startswith("Context:") and user.endswith("What is this about?")
    assert url not in user.split('"""')[-1]  # the URL is removed from the question
    sources = json.loads(response.headers["X-Sources"])
    assert sources[0]["url"] == url


def test_context_marker_and_unterminated_marker(client, fake_engine):
    ok = client.get("/gpt/greedy", query_string={"prompt": "|CONTEXT|The door code is 4321.|/CONTEXT| Code?"})
    assert ok.status_code == 200
    assert "4321" in fake_engine.requests[-1].messages[-1]["content"]
    bad = client.get("/gpt/greedy", query_string={"prompt": "|CONTEXT|never closed"})
    assert bad.status_code == 400 and "CONTEXT" in bad.get_json()["error"]["message"]


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",
    "http://2130706433/",
    "http://[::ffff:10.0.0.1]/",
    "http://0x7f.1/",
    "file:///etc/passwd",
])
def test_ssrf_probes_are_refused_and_question_still_answered(client, fake_engine, url):
    response = client.get("/gpt/greedy", query_string={"prompt": f"{url} What is there?"})
    assert response.status_code == 200
    assert "X-Sources" not in response.headers
    notices = json.loads(response.headers["X-Notices"])
    assert any("Could not fetch" in notice or "refused" in notice.lower() for notice in notices)
    asked = fake_engine.requests[-1].messages[-1]["content"]
    # The model reads the question and that the page could not be read, so it does not pretend it did.
    assert asked.endswith("What is there?") and "could not be read" in asked and "Say so" in asked
    assert response.get_data(as_text=True).startswith("Note: ")  # and the reader sees it in the answer


def test_redirect_to_metadata_is_refused(rag_app, fake_engine, pages):
    target = "http://169.254.169.254/latest/"
    url = pages.url(f"/redirect?to={target}")
    response = rag_app.test_client().get("/gpt/greedy", query_string={"prompt": f"{url} Read it"})
    assert response.status_code == 200 and "X-Sources" not in response.headers
    assert "169.254.169.254" in response.headers["X-Notices"]


def test_toil_text_url_is_fetched(rag_app, fake_engine, pages):
    fake_engine.script(['{"title": "x"}'])
    url = pages.url("/fixtures/rss.xml")
    response = rag_app.test_client().post("/toil/greedy", json={"prompt": "Titles?", "text": url})
    assert response.status_code == 200
    assert json.loads(response.headers["X-Sources"])[0]["url"] == url
    assert fake_engine.requests[-1].messages[-1]["content"].startswith("Context:")


def test_socket_json_status_and_source_frames(rag_app, pages):
    server = LiveServer(rag_app)
    try:
        ws = websocket.create_connection(f"{server.ws_url}/gpt-socket/greedy?format=json", timeout=10)
        url = pages.url("/fixtures/article.html")
        ws.send(f"{url} Summarise")
        frames = []
        while not frames or frames[-1]["type"] != "end":
            frames.append(json.loads(ws.recv()))
        ws.close()
    finally:
        server.close()
    kinds = [frame["type"] for frame in frames]
    assert "status" in kinds and kinds.index("status") < kinds.index("source") < kinds.index("token")
    assert any(frame["type"] == "source" and frame["url"] == url for frame in frames)


def test_openai_last_user_message_gets_context(rag_app, fake_engine, pages):
    url = pages.url("/fixtures/main.html")
    response = rag_app.test_client().post("/v1/chat/completions", json={
        "model": "greedy", "messages": [{"role": "user", "content": f"{url} What is it?"}]})
    assert response.status_code == 200
    assert fake_engine.requests[-1].messages[-1]["content"].startswith("Context:")
