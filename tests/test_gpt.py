"""/gpt on the fake engine: parameters, errors, sessions."""

from __future__ import annotations

import pytest

from llm.errors import Overloaded


def test_get_returns_text(client, fake_engine):
    response = client.get("/gpt/greedy?prompt=Hello")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == "Hello from the fake engine."
    request = fake_engine.requests[-1]
    assert request.messages[0] == {"role": "system", "content": "You are a test assistant."}
    assert request.messages[-1] == {"role": "user", "content": "Hello"}
    assert request.sampling.temperature == 0 and request.sampling.max_tokens == 24


@pytest.mark.parametrize("kwargs", [
    {"data": {"prompt": "Hi there"}},
    {"json": {"prompt": "Hi there"}},
])
def test_post_form_and_json(client, fake_engine, kwargs):
    response = client.post("/gpt/greedy", **kwargs)
    assert response.status_code == 200
    assert fake_engine.requests[-1].messages[-1]["content"] == "Hi there"


@pytest.mark.parametrize("url, method, kwargs, status, needle", [
    ("/gpt/nobody?prompt=Hi", "get", {}, 404, "Unknown personality 'nobody'"),
    ("/gpt/greedy", "get", {}, 400, "prompt"),
    ("/gpt/greedy?prompt=%20%20", "get", {}, 400, "prompt"),
    ("/gpt/greedy", "post", {"json": ["not", "an", "object"]}, 400, "JSON object"),
    ("/gpt/greedy", "post", {"json": {"prompt": 5}}, 400, "prompt"),
    ("/gpt/greedy", "post", {"data": "{bad json", "content_type": "application/json"}, 400, "JSON object"),
    ("/gpt/greedy", "post", {"json": {"prompt": "hi", "session": ["x"]}}, 400, "session"),
    ("/gpt/greedy", "delete", {}, 405, "method"),
])
def test_errors_are_json(client, url, method, kwargs, status, needle):
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == status
    body = response.get_json()
    assert body["error"]["status"] == status
    assert needle.lower() in body["error"]["message"].lower()


def test_overloaded_is_503_with_retry_after(client, fake_engine):
    fake_engine.script(Overloaded())
    response = client.get("/gpt/greedy?prompt=Hi")
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert response.get_json()["error"]["type"] == "overloaded"


def test_session_continues_conversation(client, fake_engine):
    fake_engine.script(["First answer."])
    first = client.get("/gpt/greedy?prompt=One&session=abc")
    assert first.headers["X-Conversation"] == "abc"
    client.get("/gpt/greedy?prompt=Two&session=abc")
    messages = fake_engine.requests[-1].messages
    assert [m["content"] for m in messages[1:]] == ["One", "First answer.", "Two"]
    # The engine's cache key is the conversation's internal id, never the id a client chose.
    assert fake_engine.requests[-1].conversation == client.application.extensions["llm"].store.get("abc").key


def test_without_session_each_prompt_stands_alone(client, fake_engine):
    client.get("/gpt/greedy?prompt=One")
    client.get("/gpt/greedy?prompt=Two")
    assert len(fake_engine.requests[-1].messages) == 2
    assert fake_engine.requests[-1].conversation is None


def test_session_bound_to_its_personality(client):
    client.get("/gpt/greedy?prompt=One&session=mine")
    response = client.get("/gpt/other?prompt=Two&session=mine")
    assert response.status_code == 400
    assert "belongs to personality" in response.get_json()["error"]["message"]


def test_date_rides_in_the_user_turn_not_the_system_prompt(client, fake_engine):
    client.get("/gpt/other?prompt=What day is it?")
    system, user = fake_engine.requests[-1].messages
    assert "Today is" not in system["content"]
    assert user["content"].startswith("(Today is ") and user["content"].endswith("What day is it?")


def test_personalities_listing(client):
    body = client.get("/personalities").get_json()
    names = [item["name"] for item in body["personalities"]]
    assert names == ["greedy", "other", "structured"]
    first = body["personalities"][0]
    assert first["intro"] == "Test intro." and first["model"] == "fake-model.gguf"
    assert "system_prompt" not in first
