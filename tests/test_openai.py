"""The /v1 API with the official openai client: models, chat, streaming, structured output, errors."""

from __future__ import annotations

import json
import math
import threading

import openai
import pytest
from pydantic import BaseModel

from llm.errors import Overloaded
from tests.conftest import LiveServer


def client_for(server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def oai(live_fake):
    client = client_for(live_fake)
    yield client
    client.close()


def test_list_models(oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["greedy", "other", "structured", "wordllama-l2-supercat"]
    assert models.data[0].model_extra["gguf"] == "fake-model.gguf"


def test_chat_non_streaming(oai, fake_engine):
    reply = oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=50, temperature=0.3, seed=7, stop=["zz"])
    assert reply.choices[0].message.content == "Hello from the fake engine."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 5
    request = fake_engine.requests[-1]
    assert request.messages[0]["content"] == "You are a test assistant."  # personality system prompt prepended
    assert request.sampling.max_tokens == 50 and request.sampling.seed == 7 and request.sampling.stop == ("zz",)


def test_own_system_message_replaces_personality_prompt(oai, fake_engine):
    oai.chat.completions.create(model="greedy", messages=[{"role": "system", "content": "Pirate."},
                                                          {"role": "user", "content": "Hi"}])
    assert [m["content"] for m in fake_engine.requests[-1].messages] == ["Pirate.", "Hi"]


def test_finish_reason_length(oai, fake_engine):
    reply = oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content == "Hello from"


def test_chat_streaming_with_usage(oai):
    stream = oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "Hi"}], stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake engine."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 5


def test_text_completion(oai, fake_engine):
    reply = oai.completions.create(model="greedy", prompt="Once upon a time")
    assert reply.choices[0].text == "Hello from the fake engine."
    assert fake_engine.requests[-1].raw_prompt == "Once upon a time"


def test_structured_output_parsed_by_client(oai, fake_engine):
    class City(BaseModel):
        name: str
        population: int

    fake_engine.script(['{"name": "Lyon",', ' "population": 522000}'])
    reply = oai.beta.chat.completions.parse(model="greedy", messages=[{"role": "user", "content": "A city"}],
                                            response_format=City)
    assert reply.choices[0].message.parsed == City(name="Lyon", population=522000)
    assert fake_engine.requests[-1].constraint.schema["properties"]["population"]["type"] == "integer"


def test_structured_output_never_returns_invalid(oai, fake_engine):
    fake_engine.script(['{"name": 5}'])
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    with pytest.raises(openai.APIStatusError) as info:
        oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": schema, "strict": True}})
    assert info.value.status_code >= 400


@pytest.mark.parametrize("call, exception, status", [
    (lambda c: c.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "x"}]),
     openai.NotFoundError, 404),
    (lambda c: c.chat.completions.create(model="greedy", messages=[]), openai.BadRequestError, 400),
    (lambda c: c.chat.completions.create(model="greedy", messages=[{"role": "wizard", "content": "x"}]),
     openai.BadRequestError, 400),
    (lambda c: c.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "x"}], n=9),
     openai.BadRequestError, 400),
    (lambda c: c.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "x"}],
                                         temperature=9), openai.BadRequestError, 400),
    (lambda c: c.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "x"}],
                                         response_format={"type": "json_schema",
                                                          "json_schema": {"name": "x", "schema": {"type": 5}}}),
     openai.BadRequestError, 400),
    (lambda c: c.embeddings.create(model="greedy", input=""), openai.BadRequestError, 400),
])
def test_errors_raise_client_exceptions(oai, call, exception, status):
    with pytest.raises(exception) as info:
        call(oai)
    assert info.value.status_code == status
    assert info.value.body["message"]


def test_context_length_exceeded(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "word " * 5000}])
    assert info.value.code == "context_length_exceeded"


def test_overloaded_is_503(oai, fake_engine):
    fake_engine.script(Overloaded())
    with pytest.raises(openai.InternalServerError) as info:
        oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 503


def test_api_keys_required_when_configured(make_app):
    server = LiveServer(make_app(LLM_API_KEYS="alice:secret-a,secret-b"))
    try:
        with client_for(server, "wrong") as bad, pytest.raises(openai.AuthenticationError):
            bad.models.list()
        for key in ("secret-a", "secret-b"):
            with client_for(server, key) as good:
                assert good.models.list().data
    finally:
        server.close()


def test_concurrent_streaming_clients(live_fake, fake_engine):
    fake_engine.delay = 0.002
    results = {}

    def run(index: int) -> None:
        with client_for(live_fake) as client:
            stream = client.chat.completions.create(model="greedy", messages=[{"role": "user", "content": f"{index}"}],
                                                    stream=True)
            results[index] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert list(results.values()) == ["Hello from the fake engine."] * 6


@pytest.mark.integration
def test_real_model_structured_output(live_real):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["colour", "count"], "additionalProperties": False}
    with client_for(live_real) as client:
        reply = client.chat.completions.create(
            model="greedy", messages=[{"role": "user", "content": "Pick a colour and a count."}], max_tokens=60,
            response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema, "strict": True}})
        value = json.loads(reply.choices[0].message.content)
        assert value["colour"] in ("red", "green", "blue") and 1 <= value["count"] <= 9
        stream = client.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "Hello"}],
                                                stream=True, max_tokens=8)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_client_disconnect_stops_streaming_generation(live_fake, fake_engine):
    import http.client

    fake_engine.delay = 0.05
    fake_engine.script([f" w{i}" for i in range(2000)])  # 100 s if never cancelled: far past the wait below
    conn = http.client.HTTPConnection("127.0.0.1", live_fake.port, timeout=60)
    body = json.dumps({"model": "greedy", "stream": True, "messages": [{"role": "user", "content": "long"}]})
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.read1(64)
    response.close()  # the client goes away mid-answer
    conn.close()
    # The server notices the disconnect itself (not at its next failed write) and cancels at once; the wait is
    # generous for busy machines and fails only if cancellation never happens.
    assert fake_engine.cancelled.wait(60)


def test_several_choices_are_decoded_together(oai, fake_engine):
    for text in ("One.", "Two.", "Three."):
        fake_engine.script([text])
    reply = oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "x"}], n=3, seed=7)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert sorted(choice.message.content for choice in reply.choices) == ["One.", "Three.", "Two."]
    assert sorted(r.sampling.seed for r in fake_engine.requests[-3:]) == [7, 8, 9]  # each choice its own seed
    assert reply.usage.completion_tokens == 3


def test_llama_server_parameters_are_honoured(oai, fake_engine):
    oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "x"}], logit_bias={"42": -100},
                                extra_body={"top_k": 7, "min_p": 0.2, "repeat_penalty": 1.3, "ignore_eos": True})
    sampling = fake_engine.requests[-1].sampling
    assert (sampling.top_k, sampling.min_p, sampling.repeat_penalty, sampling.ignore_eos) == (7, 0.2, 1.3, True)
    assert sampling.logit_bias == ((42, -100.0),)


@pytest.mark.parametrize("extra", [{"functions": [{"name": "f", "parameters": {"type": "object"}}]},
                                   {"prediction": {"type": "content", "content": "x"}}])
def test_parameters_not_supported_yet_are_refused_by_name(oai, extra):
    name = next(iter(extra))
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "x"}], **extra)
    assert caught.value.body["param"] == name and name in caught.value.body["message"]


def test_models_say_their_context_length_and_capabilities(oai):
    card = oai.models.retrieve("greedy").model_dump()
    assert card["context_length"] > 0 and card["capabilities"]["json_schema"] is True
    assert card["capabilities"]["tools"] is True


def test_several_choices_stream_interleaved(oai, fake_engine):
    for text in (["One", " two"], ["Three", " four", " five"]):
        fake_engine.script(text)
    chunks = list(oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "x"}], n=2,
                                              stream=True, stream_options={"include_usage": True}))
    texts, reasons = {0: "", 1: ""}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    assert sorted(texts.values()) == ["One two", "Three four five"] and reasons == {0: "stop", 1: "stop"}
    assert chunks[-1].usage.completion_tokens == 5


def test_logprobs_come_with_each_token(oai, fake_engine):
    fake_engine.script(["Hello", " there"])
    reply = oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "x"}], logprobs=True,
                                        top_logprobs=1)
    content = reply.choices[0].logprobs.content
    assert [entry.token for entry in content] == ["Hello", " there"] and content[0].bytes == list(b"Hello")
    assert fake_engine.requests[-1].sampling.logprobs == 1 and content[0].top_logprobs[0].logprob == 0.0
    fake_engine.script(["a", "b"])
    chunks = list(oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "x"}],
                                              logprobs=True, stream=True))
    streamed = [entry.token for chunk in chunks for entry in (chunk.choices[0].logprobs.content
                                                              if chunk.choices[0].logprobs else [])]
    assert streamed == ["a", "b"]
    text = oai.completions.create(model="greedy", prompt="x", logprobs=2)
    assert text.choices[0].logprobs.tokens == ["Hello", " from", " the", " fake", " engine."]
    assert text.choices[0].logprobs.text_offset == [0, 5, 10, 14, 19]


@pytest.mark.parametrize(("extra", "param"), [({"top_logprobs": 3}, "top_logprobs"),
                                              ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                                              ({"logprobs": 3}, "logprobs")])
def test_bad_logprobs_are_400s(oai, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "x"}], **extra)
    assert caught.value.body["param"] == param


def test_real_model_logprobs_are_probabilities(live_real):
    with client_for(live_real) as client:
        reply = client.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=5, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:  # greedy: the chosen token is the most likely one, and probabilities sum below 1
        assert entry.logprob <= 0 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert sum(math.exp(top.logprob) for top in entry.top_logprobs) <= 1.0001


def test_parameters_left_out_keep_the_personalitys_values(oai, fake_engine):
    oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "x"}], top_p=0.5)
    sampling = fake_engine.requests[-1].sampling
    assert (sampling.temperature, sampling.repeat_penalty, sampling.max_tokens, sampling.top_p) == (0, 1.0, 24, 0.5)
