"""The Anthropic Messages API with the official ``anthropic`` SDK as the client, against a live server."""

from __future__ import annotations

import anthropic
import pytest

from tests.conftest import LiveServer


@pytest.fixture
def claude(make_app):
    server = LiveServer(make_app(LLM_API_KEYS="alice:secret"))
    client = anthropic.Anthropic(base_url=server.url, api_key="secret", max_retries=0)
    yield client
    client.close()
    server.close()


def test_message_with_system_and_history(claude, fake_engine):
    fake_engine.script(["Hello", " Alice."])
    reply = claude.messages.create(model="greedy", max_tokens=64, system="Be warm.", messages=[
        {"role": "user", "content": "Hi, I am Alice."}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "Who am I?"}]}])
    assert reply.content[0].text == "Hello Alice." and reply.role == "assistant"
    assert reply.stop_reason == "end_turn" and reply.usage.output_tokens == 2
    sent = fake_engine.requests[-1]
    assert [m["role"] for m in sent.messages] == ["system", "user", "assistant", "user"]
    assert sent.messages[0]["content"] == "Be warm." and sent.sampling.max_tokens == 64


def test_streaming_events(claude, fake_engine):
    fake_engine.script(["One", " two", " three."])
    with claude.messages.stream(model="greedy", max_tokens=32, messages=[{"role": "user", "content": "Count"}]) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert "".join(pieces) == "One two three."
    assert final.content[0].text == "One two three." and final.stop_reason == "end_turn"


def test_max_tokens_and_stop_sequences(claude, fake_engine):
    fake_engine.script(["a", "b", "c", "d"])
    reply = claude.messages.create(model="greedy", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    assert reply.stop_reason == "max_tokens"
    # This SDK release no longer names the sampling knobs; older clients send them as top-level fields, as here.
    claude.messages.create(model="greedy", max_tokens=8, stop_sequences=["END"],
                           messages=[{"role": "user", "content": "x"}], extra_body={"temperature": 0.5, "top_k": 5})
    sampling = fake_engine.requests[-1].sampling
    assert sampling.stop == ("END",) and sampling.temperature == 0.5 and sampling.top_k == 5


def test_count_tokens(claude):
    counted = claude.messages.count_tokens(model="greedy", messages=[{"role": "user", "content": "one two three"}])
    assert counted.input_tokens > 3


def test_errors_in_anthropics_shape(claude, make_app):
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="nobody", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model="greedy", max_tokens=8, messages=[{"role": "user", "content": "x"}],
                               tools=[{"name": "f", "input_schema": {"type": "object"}}])
    assert caught.value.body["error"]["type"] == "invalid_request_error" and "tools" in caught.value.message
    with anthropic.Anthropic(base_url=claude.base_url, api_key="wrong", max_retries=0) as stranger, \
            pytest.raises(anthropic.AuthenticationError):
        stranger.messages.create(model="greedy", max_tokens=8, messages=[{"role": "user", "content": "x"}])
