"""Mistral's own tool format on a real (tiny, random-weight) GGUF with Mistral's control tokens and template.

The weights are noise, so what these tests prove is the machinery: the grammar writes ``[TOOL_CALLS]`` by its
token id and then only valid calls, the reader turns them into OpenAI and Anthropic calls, the history reaches
the model through Mistral's template with its control tokens, and nothing a client writes becomes one.
"""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest

from app import create_app
from llm.engine.model import LoadedModel
from llm.engine.tools import MISTRAL, ToolUse, check_tool, model_history
from llm.errors import ConfigError
from llm.models import ModelSpec, embedded_model_path
from llm.settings import load_settings
from tests.conftest import TEST_PERSONALITIES, LiveServer
from tests.mistral_model import token_id, write_tiny_mistral
from tests.test_tools import MARKED

# Closed schemas: a random model must still finish its call within max_tokens.
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {}, "additionalProperties": False}}}]
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
CALLS = token_id("[TOOL_CALLS]")


@pytest.fixture(scope="module")
def mistral_file(tmp_path_factory):
    return write_tiny_mistral(tmp_path_factory.mktemp("mistral") / "tiny-mistral.gguf")


@pytest.fixture(scope="module")
def mistral_server(mistral_file, tmp_path_factory):
    database = tmp_path_factory.mktemp("db") / "conversations.db"
    app = create_app({"TESTING": True, "LLM_PERSONALITIES_DIR": str(TEST_PERSONALITIES), "LLM_CONTEXT_WINDOW": 4096,
                      "DATABASE_URL": f"sqlite:///{database}", "LLM_PARALLEL": 2, "LLM_CPU_THREADS": 2,
                      "LLM_MODEL_FILE": str(mistral_file)})
    server = LiveServer(app)
    yield server
    server.close()
    app.extensions["llm"].engine.close()


@pytest.fixture
def oai(mistral_server):
    client = openai.OpenAI(base_url=f"{mistral_server.url}/v1", api_key="none", max_retries=0, timeout=300)
    yield client
    client.close()


def check_call(message) -> None:
    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        tool = next(t["function"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), tool["parameters"])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_choices_give_valid_calls(oai, choice):
    reply = oai.chat.completions.create(model="greedy", messages=QUESTION, tools=TOOLS, tool_choice=choice,
                                        parallel_tool_calls=False, max_tokens=200)
    assert reply.choices[0].finish_reason == "tool_calls"
    check_call(reply.choices[0].message)
    if isinstance(choice, dict):
        assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_with_auto_the_control_token_is_the_models_choice_between_a_call_and_text(oai):
    """Steering the random model towards [TOOL_CALLS] gives a call, away from it text: the token is one the
    grammar allows first, and only there."""
    ask = dict(model="greedy", messages=QUESTION, tools=TOOLS, parallel_tool_calls=False, max_tokens=200)
    called = oai.chat.completions.create(**ask, logit_bias={str(CALLS): 100})
    assert called.choices[0].finish_reason == "tool_calls"
    check_call(called.choices[0].message)
    talked = oai.chat.completions.create(**ask, logit_bias={str(CALLS): -100})
    assert talked.choices[0].finish_reason in ("stop", "length") and talked.choices[0].message.content
    assert not talked.choices[0].message.tool_calls


def test_streamed_calls_match_the_whole_answer(oai):
    ask = dict(model="greedy", messages=QUESTION, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
               max_tokens=200)
    whole = oai.chat.completions.create(**ask).choices[0].message.tool_calls
    with oai.chat.completions.stream(**ask) as stream:
        streamed = stream.get_final_completion().choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in whole]


def test_a_history_with_calls_and_results_is_answered(oai):
    reply = oai.chat.completions.create(model="greedy", tools=TOOLS, max_tokens=8, messages=[
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], tool_choice="none")
    assert reply.choices[0].finish_reason in ("stop", "length") and not reply.choices[0].message.tool_calls


def test_the_anthropic_sdk_gets_tool_use_blocks(mistral_server):
    with anthropic.Anthropic(base_url=mistral_server.url, api_key="none", max_retries=0, timeout=300) as client:
        reply = client.messages.create(
            model="greedy", max_tokens=200, messages=QUESTION, tool_choice={"type": "any"},
            tools=[{"name": "get_weather", "description": "Weather.", "input_schema": WEATHER}])
    assert reply.stop_reason == "tool_use"
    jsonschema.validate(reply.content[-1].input, WEATHER)


@pytest.fixture(scope="module")
def mistral_model(mistral_file):
    model = LoadedModel(ModelSpec(str(mistral_file), 2048), load_settings({}))
    yield model
    model.close()


def test_the_prompt_holds_mistrals_control_tokens_and_no_client_string_becomes_one(mistral_model):
    assert mistral_model.tool_format is MISTRAL  # chosen from the template
    tools = ToolUse((check_tool("get_weather", "[TOOL_CALLS] in a description", WEATHER, "tools[0]"),),
                    format=MISTRAL)
    history = model_history([{**MARKED[0], "content": "[AVAILABLE_TOOLS] in the system prompt"}, *MARKED[1:]],
                            MISTRAL, tools)
    tokens = mistral_model.tokenize_messages(history)
    counts = {text: tokens.count(token_id(text)) for text in (
        "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]", "</s>")}
    # The template's own: two questions, one list of calls, the tools once, two results, two ended answers.
    assert counts == {"[INST]": 2, "[/INST]": 2, "[TOOL_CALLS]": 1, "[AVAILABLE_TOOLS]": 1, "[/AVAILABLE_TOOLS]": 1,
                      "[TOOL_RESULTS]": 2, "[/TOOL_RESULTS]": 2, "</s>": 2}


def test_the_format_needs_a_template_and_the_control_token(mistral_file):
    with pytest.raises(ConfigError, match="written by the model's own chat template"):
        LoadedModel(ModelSpec(str(mistral_file), 2048), load_settings({}, {
            "LLM_CHAT_FORMAT": "chatml", "LLM_TOOL_FORMAT": "mistral"}))
    settings = load_settings({}, {"LLM_TOOL_FORMAT": "mistral"})
    embedded = embedded_model_path(settings)  # a template, no [TOOL_CALLS]
    with pytest.raises(ConfigError, match=r"needs the \[TOOL_CALLS\] control token"):
        LoadedModel(ModelSpec(embedded, 2048), settings)
