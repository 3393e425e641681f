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
                               tools=[{"name": "a b", "input_schema": {"type": "object"}}])
    assert caught.value.body["error"]["type"] == "invalid_request_error" and "tools[0]" in caught.value.message
    with anthropic.Anthropic(base_url=claude.base_url, api_key="wrong", max_retries=0) as stranger, \
            pytest.raises(anthropic.AuthenticationError):
        stranger.messages.create(model="greedy", max_tokens=8, messages=[{"role": "user", "content": "x"}])


WEATHER = {"name": "get_weather", "description": "Weather for a city.", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>'


def test_tool_use_comes_back_as_a_tool_use_block(claude, fake_engine):
    fake_engine.script([CALL])
    reply = claude.messages.create(model="greedy", max_tokens=64, tools=[WEATHER], tool_choice={"type": "any"},
                                   messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert reply.stop_reason == "tool_use" and reply.content[0].type == "tool_use"
    assert reply.content[0].name == "get_weather" and reply.content[0].input == {"city": "Paris"}
    assert reply.content[0].id.startswith("toolu_")
    request = fake_engine.requests[-1]
    assert "start: calls" in request.constraint.lark and "<tools>" in request.messages[0]["content"]


def test_tool_use_streams_as_input_json_deltas(claude, fake_engine):
    fake_engine.script(list(CALL))
    with claude.messages.stream(model="greedy", max_tokens=200, tools=[WEATHER],
                                messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert any(event.type == "input_json" for event in events)
    assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "Paris"}
    assert [block.type for block in final.content] == ["tool_use"]


def test_tool_results_in_the_history_reach_the_model(claude, fake_engine):
    claude.messages.create(model="greedy", max_tokens=64, tools=[WEATHER], tool_choice={"type": "none"}, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, {
            "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}])
    messages = fake_engine.requests[-1].messages
    assert messages[2]["content"] == "Checking.\n" + CALL
    assert messages[3]["content"] == "<tool_response>\nsunny\n</tool_response>"
    assert fake_engine.requests[-1].constraint is None  # tool_choice none: text only
    counted = claude.messages.count_tokens(model="greedy", tools=[WEATHER],
                                           messages=[{"role": "user", "content": "Weather in Paris?"}])
    plain = claude.messages.count_tokens(model="greedy", messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert counted.input_tokens > plain.input_tokens


def test_real_model_tool_use_is_valid(live_real):
    with anthropic.Anthropic(base_url=live_real.url, api_key="none", max_retries=0, timeout=300) as client:
        reply = client.messages.create(
            model="greedy", max_tokens=80, tools=[WEATHER], messages=[{"role": "user", "content": "Paris weather?"}],
            tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
    assert reply.stop_reason == "tool_use" and [block.type for block in reply.content] == ["tool_use"]
    assert isinstance(reply.content[0].input["city"], str)


def test_real_model_names_the_stop_sequence_that_ended_the_answer(live_real):
    with anthropic.Anthropic(base_url=live_real.url, api_key="none", max_retries=0, timeout=300) as client:
        cut = client.messages.create(model="greedy", max_tokens=60, stop_sequences=["zzz-never", "e"],
                                     messages=[{"role": "user", "content": "Describe the sea."}])
        free = client.messages.create(model="greedy", max_tokens=60, stop_sequences=["zzz-never"],
                                      messages=[{"role": "user", "content": "Describe the sea."}])
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", "e") and "e" not in cut.content[0].text
    assert free.stop_reason in ("end_turn", "max_tokens") and free.stop_sequence is None
