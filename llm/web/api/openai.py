"""An OpenAI-compatible API (``/v1``) with personalities as models, so existing clients work unchanged.

Chat and text completions, streaming as server-sent events in OpenAI's chunk format, structured output with
the same guarantees as ``/toil``, and errors in OpenAI's shape (rendered by ``llm.web.api.errors``). API keys
(``LLM_API_KEYS``) are checked for every endpoint by ``llm.web.auth``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from flask import Blueprint, jsonify, request

from llm.conversation.service import ActiveTurn, message_text
from llm.engine import JsonConstraint
from llm.engine.tools import ToolUse, check_tool, client_call_id
from llm.errors import BadRequest, PayloadTooLarge
from llm.schema_support import check_schema
from llm.web.api import services, structured
from llm.web.api.openai_output import (
    answer,
    chat_chunks,
    chat_logprobs,
    finish_reason,
    run_choices,
    sse,
    start_choices,
    text_chunks,
    text_logprobs,
    usage_of,
)
from llm.web.auth import current_user

blueprint = Blueprint("openai", __name__, url_prefix="/v1")


def body() -> dict:
    data = request.get_json(silent=True) if request.is_json else None
    if not isinstance(data, dict):
        raise BadRequest("The body must be a JSON object.")
    return data


def _number(data: dict, name: str, low: float, high: float, integer: bool = False) -> Any:
    value = data.get(name)
    if value is None:
        return None
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind_ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{name}' must be {kind} between {low} and {high}.", param=name)
    return value


# OpenAI parameters this API does not honour yet: a 400 naming them, never a silent answer without them.
NOT_YET = ("functions", "function_call", "audio", "modalities", "prediction", "web_search_options", "suffix",
           "echo", "best_of")
MAX_CHOICES = 8


def refuse_unsupported(data: dict) -> None:
    for name in NOT_YET:
        if data.get(name) not in (None, False, 0):
            raise BadRequest(f"'{name}' is not supported by this service yet.", param=name)


def choices_wanted(data: dict) -> int:
    """``n``: several answers to one request, decoded together in the batch (not with a schema, whose answers
    are validated and resampled one by one)."""
    count = _number(data, "n", 1, MAX_CHOICES, True) or 1
    if count > 1 and data.get("response_format") not in (None, {"type": "text"}):
        raise BadRequest("'n' above 1 is not supported with response_format.", param="n")
    return count


def chat_logprobs_wanted(data: dict) -> int | None:
    """``logprobs`` (true: each token's log-probability) and ``top_logprobs`` (0-20 alternatives per token)."""
    wanted, top = _flag(data, "logprobs"), _number(data, "top_logprobs", 0, 20, True)
    if top is not None and not wanted:
        raise BadRequest("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    return (top or 0) if wanted else None


def _logit_bias(data: dict) -> dict[int, float] | None:
    bias = data.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict) or len(bias) > 300 or not all(
            str(token).isdigit() and isinstance(value, int | float) and not isinstance(value, bool)
            and -100 <= value <= 100 for token, value in bias.items()):
        raise BadRequest("'logit_bias' must map up to 300 token ids to numbers from -100 to 100.",
                         param="logit_bias")
    return {int(token): float(value) for token, value in bias.items()}


def sampling_options(data: dict) -> dict[str, Any]:
    """OpenAI (and llama-server) parameters mapped onto our sampling settings (None: the personality's default)."""
    refuse_unsupported(data)
    stop = data.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(item, str) and item for item in stop)):
        raise BadRequest("'stop' must be a string or a list of up to 4 non-empty strings.", param="stop")
    max_tokens = _number(data, "max_completion_tokens", 1, 1 << 20, True) or _number(data, "max_tokens", 1, 1 << 20,
                                                                                     True)
    return {"temperature": _number(data, "temperature", 0, 2), "top_p": _number(data, "top_p", 0.0001, 1),
            "seed": _number(data, "seed", 0, 2**63, True), "max_tokens": max_tokens, "stop": stop,
            "presence_penalty": _number(data, "presence_penalty", -2, 2),
            "frequency_penalty": _number(data, "frequency_penalty", -2, 2),
            # llama-server's own parameters (the openai SDK sends them through extra_body)
            "top_k": _number(data, "top_k", 0, 1 << 20, True), "min_p": _number(data, "min_p", 0, 1),
            "repeat_penalty": _number(data, "repeat_penalty", 0, 10), "logit_bias": _logit_bias(data),
            "ignore_eos": _flag(data, "ignore_eos")}


def _flag(data: dict, name: str) -> bool | None:
    value = data.get(name)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false.", param=name)
    return value


def response_constraint(data: dict) -> tuple[JsonConstraint | None, Any]:
    """``response_format``: json_object or json_schema (validated like /toil), else free text."""
    fmt = data.get("response_format")
    if fmt is None:
        return None, None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest("response_format.type must be text, json_object or json_schema.", param="response_format")
    if fmt["type"] == "text":
        return None, None
    if fmt["type"] == "json_object":
        return JsonConstraint(None), None
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise BadRequest("response_format.json_schema.schema is required.", param="response_format")
    check_schema(spec["schema"])
    return JsonConstraint(spec["schema"]), spec["schema"]


def tool_use(data: dict) -> ToolUse | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls``; None when the model is not to call anything."""
    tools, choice = data.get("tools"), data.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise BadRequest("'tool_choice' needs 'tools'.", param="tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise BadRequest("'tools' must be a non-empty list.", param="tools")
    offered = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict):
            raise BadRequest(f"tools[{index}] must be {{\"type\": \"function\", \"function\": {{...}}}}.",
                             param=f"tools[{index}]")
        offered.append(check_tool(function.get("name"), function.get("description"), function.get("parameters"),
                                  f"tools[{index}]"))
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        choice = choice["function"].get("name")
    if choice is None:
        choice = "auto"
    if not isinstance(choice, str):
        raise BadRequest("'tool_choice' must be none, auto, required or {\"type\": \"function\", ...}.",
                         param="tool_choice")
    if choice == "none":
        return None
    if data.get("response_format") is not None:
        raise BadRequest("Use either tools or response_format, not both.", param="response_format")
    return ToolUse(tuple(offered), choice, _flag(data, "parallel_tool_calls") is not False)


def plain_history(messages: Any) -> Any:
    """OpenAI's tool history marked for the chat service: an assistant turn with ``tool_calls`` carries its
    ``calls`` (name, arguments, id); consecutive ``tool`` messages become one user turn of ``results`` (id, text)."""
    if not isinstance(messages, list):
        return messages
    converted: list[dict] = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "assistant" and message.get("tool_calls"):
            calls = message["tool_calls"]
            if not isinstance(calls, list) or not all(
                    isinstance(call, dict) and isinstance(call.get("function"), dict)
                    and isinstance(call["function"].get("name"), str)
                    and isinstance(call["function"].get("arguments"), str) for call in calls):
                raise BadRequest(f"messages[{index}].tool_calls must be a list of function calls with name and "
                                 "arguments.", param=f"messages[{index}].tool_calls")
            content = message_text({"role": "assistant", "content": message.get("content") or ""}, index)["content"]
            converted.append({"role": "assistant", "content": content, "calls": [(
                call["function"]["name"], call["function"]["arguments"], client_call_id(call.get("id")))
                for call in calls]})
        elif role == "tool":
            result = (client_call_id(message.get("tool_call_id")),
                      message_text({"role": "user", "content": message.get("content")}, index)["content"])
            last = converted[-1] if converted and isinstance(converted[-1], dict) else {}
            if last.get("results") and not last["content"]:
                last["results"].append(result)
            else:
                converted.append({"role": "user", "content": "", "results": [result]})
        else:
            converted.append(message)
    return converted


def context_errors(error: PayloadTooLarge) -> BadRequest:
    """OpenAI reports an over-long prompt as a 400 with code context_length_exceeded."""
    converted = BadRequest(error.message, param="messages")
    converted.code = "context_length_exceeded"
    return converted


# What /v1 does with a personality today, so clients can tell before they try.
CAPABILITIES = {"chat": True, "completions": True, "streaming": True, "json_schema": True, "n": True,
                "tools": True, "logprobs": True}


def model_card(personality) -> dict:
    spec = services().specs(personality)
    return {"id": personality.name, "object": "model", "created": 0, "owned_by": "local",
            "description": personality.description, "gguf": spec.name, "context_length": spec.context_window,
            "language": personality.language,
            "capabilities": {**CAPABILITIES, "embeddings": services().embeddings.enabled}}


def embedding_card() -> dict:
    """The embedding model (its name and any personality's serve ``/v1/embeddings``)."""
    return {"id": services().embeddings.name, "object": "model", "created": 0, "owned_by": "local",
            "description": "Embedding model behind /v1/embeddings (LLM_EMBEDDING_MODEL).",
            "capabilities": {**dict.fromkeys(CAPABILITIES, False), "embeddings": True}}


@blueprint.get("/models")
def models():
    cards = [model_card(p) for p in services().personalities.all()]
    if services().embeddings.enabled:
        cards.append(embedding_card())
    return jsonify({"object": "list", "data": cards})


@blueprint.get("/models/<name>")
def model(name: str):
    embeddings = services().embeddings
    if embeddings.enabled and name == embeddings.name:
        return jsonify(embedding_card())
    return jsonify(model_card(services().personalities.get(name)))


def _model_name(data: dict) -> str:
    name = data.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' (a personality name) is required.", param="model")
    return name


@blueprint.post("/chat/completions")
def chat_completions():
    data = body()
    name = _model_name(data)
    constraint, schema = response_constraint(data)
    tools = tool_use(data)
    sampling = {**sampling_options(data), "logprobs": chat_logprobs_wanted(data)}
    messages = plain_history(data.get("messages"))
    knowledge = bool(_flag(data, "knowledge"))

    def start(options: dict, seconds: float | None = None) -> ActiveTurn:
        try:
            return services().chat.start_messages(name, messages, constraint=constraint, sampling=options,
                                                  user=current_user(), timeout=seconds, tools=tools,
                                                  knowledge=knowledge)
        except PayloadTooLarge as error:
            raise context_errors(error) from None

    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    count, logprobs = choices_wanted(data), sampling["logprobs"] is not None
    if constraint is not None and not data.get("stream"):  # validated, and resampled if the grammar is a superset
        turn, value = structured.answer(start, schema, sampling, services().settings.schema_timeout,
                                        services().personalities.get(name))
        text = json.dumps(value, ensure_ascii=False)
        return jsonify({"id": ident, "object": "chat.completion", "created": created, "model": name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop",
                                     "logprobs": chat_logprobs(turn.handle.logprobs) if logprobs else None}],
                        "usage": usage_of(turn)}), 200, structured.headers(schema)
    if data.get("stream"):
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        return sse(chat_chunks(start_choices(start, sampling, count), ident, created, name, include_usage,
                               constraint, schema, logprobs))
    turns, texts = run_choices(start, sampling, count)
    choices = [{"index": index, **answer(turn, text),
                "logprobs": chat_logprobs(turn.handle.logprobs) if logprobs else None}
               for index, (turn, text) in enumerate(zip(turns, texts, strict=True))]
    return jsonify({"id": ident, "object": "chat.completion", "created": created, "model": name,
                    "choices": choices, "usage": usage_of(*turns)})


@blueprint.post("/completions")
def completions():
    data = body()
    name = _model_name(data)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    sampling, count = sampling_options(data), choices_wanted(data)
    sampling["logprobs"] = _number(data, "logprobs", 0, 5, True)  # the legacy API: how many alternatives

    def start(options: dict) -> ActiveTurn:
        try:
            return services().chat.start_raw(name, prompt, options, user=current_user())
        except PayloadTooLarge as error:
            raise context_errors(error) from None

    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    logprobs = sampling["logprobs"] is not None
    if data.get("stream"):
        return sse(text_chunks(start_choices(start, sampling, count), ident, created, name, logprobs))
    turns, texts = run_choices(start, sampling, count)
    return jsonify({"id": ident, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": index, "text": text, "finish_reason": finish_reason(turn),
                                 "logprobs": text_logprobs(turn.handle.logprobs) if logprobs else None}
                                for index, (turn, text) in enumerate(zip(turns, texts, strict=True))],
                    "usage": usage_of(*turns)})
