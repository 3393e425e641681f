"""An OpenAI-compatible API (``/v1``) with personalities as models, so existing clients work unchanged.

Chat and text completions, streaming as server-sent events in OpenAI's chunk format, structured output with
the same guarantees as ``/toil``, and errors in OpenAI's shape (rendered by ``llm.api.errors``). API keys
(``LLM_API_KEYS``) are checked for every endpoint by ``llm.auth``.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from llm.api import structured
from llm.auth import current_user
from llm.chat import ActiveTurn, message_text
from llm.embeddings import MAX_INPUTS
from llm.engine import JsonConstraint
from llm.errors import BadRequest, IncompleteOutput, PayloadTooLarge, ServiceError
from llm.schema_support import check_schema, validate_output
from llm.server import on_disconnect
from llm.tools import CallReader, ToolUse, assistant_text, check_tool, results_text

blueprint = Blueprint("openai", __name__, url_prefix="/v1")


def services():
    return current_app.extensions["llm"]


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
NOT_YET = ("logprobs", "top_logprobs", "functions", "function_call", "audio", "modalities", "prediction",
           "web_search_options", "suffix", "echo", "best_of")
MAX_CHOICES = 8


def refuse_unsupported(data: dict) -> None:
    for name in NOT_YET:
        if data.get(name) not in (None, False, 0):
            raise BadRequest(f"'{name}' is not supported by this service yet.", param=name)


def choices_wanted(data: dict) -> int:
    """``n``: several answers to one request, decoded together in the batch (not with stream or a schema)."""
    count = _number(data, "n", 1, MAX_CHOICES, True) or 1
    if count > 1 and (data.get("stream") or data.get("response_format")):
        raise BadRequest("'n' above 1 is supported without stream and response_format only.", param="n")
    return count


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
    """OpenAI's tool history in the model's format: an assistant turn with ``tool_calls`` becomes the calls as
    the model writes them; consecutive ``tool`` messages become one user turn of results."""
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
            converted.append({"role": "assistant", "content": assistant_text(
                content, [(call["function"]["name"], call["function"]["arguments"]) for call in calls])})
        elif role == "tool":
            result = message_text({"role": "user", "content": message.get("content")}, index)["content"]
            if converted and converted[-1].get("tool_result"):
                converted[-1]["results"].append(result)
            else:
                converted.append({"role": "user", "tool_result": True, "results": [result]})
        else:
            converted.append(message)
    for message in converted:
        if message.get("tool_result"):
            message["content"] = results_text(message.pop("results"))
    return converted


def context_errors(error: PayloadTooLarge) -> BadRequest:
    """OpenAI reports an over-long prompt as a 400 with code context_length_exceeded."""
    converted = BadRequest(error.message, param="messages")
    converted.code = "context_length_exceeded"
    return converted


def usage_of(*turns: ActiveTurn) -> dict[str, int]:
    """Usage of one answer, or of several choices to one prompt (its tokens counted once, as OpenAI does)."""
    first = turns[0].handle.usage
    completion = sum(turn.handle.usage.completion_tokens for turn in turns)
    return {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
            "total_tokens": first.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}


def finish_reason(turn: ActiveTurn) -> str:
    return "length" if turn.handle.finish_reason == "length" else "stop"


# What /v1 does with a personality today, so clients can tell before they try.
CAPABILITIES = {"chat": True, "completions": True, "streaming": True, "json_schema": True, "n": True,
                "tools": True, "logprobs": False}


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
    sampling = sampling_options(data)
    messages = plain_history(data.get("messages"))

    def start(options: dict, seconds: float | None = None) -> ActiveTurn:
        try:
            return services().chat.start_messages(name, messages, constraint=constraint, sampling=options,
                                                  user=current_user(), timeout=seconds, tools=tools)
        except PayloadTooLarge as error:
            raise context_errors(error) from None

    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if constraint is not None and not data.get("stream"):  # validated, and resampled if the grammar is a superset
        turn, value = structured.answer(start, schema, sampling, services().settings.schema_timeout,
                                        services().personalities.get(name))
        text = json.dumps(value, ensure_ascii=False)
        return jsonify({"id": ident, "object": "chat.completion", "created": created, "model": name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop", "logprobs": None}],
                        "usage": usage_of(turn)}), 200, structured.headers(schema)
    count = choices_wanted(data)
    if data.get("stream"):
        turn = start(sampling)
        on_disconnect(turn.cancel)
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        return sse(chat_chunks(turn, ident, created, name, include_usage, constraint, schema, tools))
    turns, texts = run_choices(start, sampling, count)
    choices = [{"index": index, **answer(turn, text, tools), "logprobs": None}
               for index, (turn, text) in enumerate(zip(turns, texts, strict=True))]
    return jsonify({"id": ident, "object": "chat.completion", "created": created, "model": name,
                    "choices": choices, "usage": usage_of(*turns)})


def answer(turn: ActiveTurn, text: str, tools: ToolUse | None) -> dict:
    """One choice's message and finish reason: text, or the calls the model made."""
    if tools is None:
        return {"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason(turn)}
    content, calls = tools.parse(text, turn.handle.finish_reason)
    if not calls:
        return {"message": {"role": "assistant", "content": content}, "finish_reason": finish_reason(turn)}
    return {"message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in calls]}, "finish_reason": "tool_calls"}


def run_choices(start, sampling: dict, count: int) -> tuple[list[ActiveTurn], list[str]]:
    """``count`` answers submitted together (the scheduler decodes them in one batch), each with its own seed."""
    seed = sampling.get("seed")
    turns = [start(sampling if count == 1 else {**sampling, "seed": None if seed is None else seed + index})
             for index in range(count)]
    for turn in turns:
        on_disconnect(turn.cancel)
    try:
        return turns, ["".join(turn.pieces()) for turn in turns]
    finally:
        for turn in turns:
            turn.cancel()


def chat_chunks(turn: ActiveTurn, ident: str, created: int, name: str, include_usage: bool,
                constraint, schema, tools: ToolUse | None = None) -> Iterator[dict]:
    def chunk(delta: dict, reason: str | None = None) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}

    reader = CallReader() if tools is not None else None
    announced = reader is None  # with tools, the role rides on the first delta, once text or call is known

    def deltas(events: Iterator[tuple]) -> Iterator[dict]:
        nonlocal announced
        for delta in map(tool_delta, events):
            yield chunk(delta if announced else {"role": "assistant", "content": None, **delta})
            announced = True

    if reader is None:
        yield chunk({"role": "assistant", "content": ""})
    try:
        for piece in turn.pieces():
            yield from deltas(reader.feed(piece)) if reader is not None else (chunk({"content": piece}),)
    finally:
        turn.cancel()
    reason = finish_reason(turn)
    if reader is not None:
        yield from deltas(reader.close())
        if reader.finish(tools, turn.handle.finish_reason)[1]:  # validates every call
            reason = "tool_calls"
    if constraint is not None:
        if turn.handle.finish_reason == "length":
            raise IncompleteOutput("The JSON value was not complete within max_tokens; raise max_tokens.")
        validate_output(schema, turn.text)
    yield chunk({}, reason)
    if include_usage:
        yield {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [],
               "usage": usage_of(turn)}


def tool_delta(event: tuple) -> dict:
    """A reader event as OpenAI streams it: a call opens with its id and name, then its arguments stream."""
    if event[0] == "text":
        return {"content": event[1]}
    if event[0] == "call":
        return {"tool_calls": [{"index": event[1], "id": event[2], "type": "function",
                                "function": {"name": event[3], "arguments": ""}}]}
    return {"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]}


def sse_lines(events: Iterator[dict], named: bool = False) -> Iterator[str]:
    """Events as server-sent event lines; an error mid-stream becomes an error event. ``named``: Anthropic's
    style (``event: <type>`` lines, no ``[DONE]``); else OpenAI's (``data:`` only, ending with ``[DONE]``)."""
    try:
        for event in events:
            head = f"event: {event['type']}\n" if named else ""
            yield f"{head}data: {json.dumps(event, ensure_ascii=False)}\n\n"
    except ServiceError as error:
        if named:
            from llm.api.anthropic import error_body

            yield f"event: error\ndata: {json.dumps(error_body(error.message, error.status))}\n\n"
        else:
            yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.type, 'code': None}})}\n\n"
    finally:
        events.close()  # runs the generator's cleanup, which cancels the engine request
    if not named:
        yield "data: [DONE]\n\n"


def sse(events: Iterator[dict]) -> Response:
    """OpenAI's server-sent events; a client that goes away cancels generation."""
    return Response(sse_lines(events), mimetype="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                               "X-Accel-Buffering": "no"})


@blueprint.post("/completions")
def completions():
    data = body()
    name = _model_name(data)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    sampling, count = sampling_options(data), choices_wanted(data)

    def start(options: dict) -> ActiveTurn:
        try:
            return services().chat.start_raw(name, prompt, options, user=current_user())
        except PayloadTooLarge as error:
            raise context_errors(error) from None

    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if data.get("stream"):
        turn = start(sampling)
        on_disconnect(turn.cancel)
        return sse(text_chunks(turn, ident, created, name))
    turns, texts = run_choices(start, sampling, count)
    return jsonify({"id": ident, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": index, "text": text, "finish_reason": finish_reason(turn), "logprobs": None}
                                for index, (turn, text) in enumerate(zip(turns, texts, strict=True))],
                    "usage": usage_of(*turns)})


def text_chunks(turn: ActiveTurn, ident: str, created: int, name: str) -> Iterator[dict]:
    try:
        for piece in turn.pieces():
            yield {"id": ident, "object": "text_completion", "created": created, "model": name,
                   "choices": [{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}]}
        yield {"id": ident, "object": "text_completion", "created": created, "model": name,
               "choices": [{"index": 0, "text": "", "finish_reason": finish_reason(turn), "logprobs": None}]}
    finally:
        turn.cancel()


@blueprint.post("/embeddings")
def embeddings():
    """Unit vectors from the service's embedding model; ``model`` is its name or any personality's."""
    data = body()
    service = services().embeddings
    name = _model_name(data)
    if name != service.name:
        services().personalities.get(name)  # a 404 in OpenAI's shape for an unknown model
    texts = embedding_inputs(data.get("input"))
    encoding = data.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be float or base64.", param="encoding_format")
    vectors, tokens = service.create(texts, _number(data, "dimensions", 1, 1 << 16, True))
    if encoding == "base64":
        encoded = [base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii") for vector in vectors]
    else:
        encoded = vectors.tolist()
    return jsonify({"object": "list", "model": service.model().name, "usage": {"prompt_tokens": tokens,
                                                                             "total_tokens": tokens},
                    "data": [{"object": "embedding", "index": index, "embedding": vector}
                             for index, vector in enumerate(encoded)]})


def embedding_inputs(value: Any) -> list[str]:
    """``input``: a string or a list of strings (token arrays are tokenizer-specific: text only)."""
    texts = [value] if isinstance(value, str) else value
    if isinstance(texts, list) and texts and all(isinstance(item, (int, list)) for item in texts):
        raise BadRequest("'input' as token ids is not supported: send text (LangChain: OpenAIEmbeddings("
                         "check_embedding_ctx_length=False)).", param="input")
    if not isinstance(texts, list) or not 1 <= len(texts) <= MAX_INPUTS or not all(
            isinstance(text, str) and text.strip() for text in texts):
        raise BadRequest(f"'input' must be a non-empty string or a list of 1 to {MAX_INPUTS} non-empty strings.",
                         param="input")
    return texts
