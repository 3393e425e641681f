"""The Anthropic Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) with personalities as models.

Clients built on the official ``anthropic`` SDK work unchanged: the same keys (the SDK sends ``x-api-key``), a
system prompt (string or text blocks), multi-turn messages with text content blocks, ``stop_sequences``,
``temperature``/``top_p``/``top_k``, ``max_tokens`` (required, as in Anthropic's API) and streaming as Anthropic's
server-sent events (``message_start``, ``content_block_delta``, ``message_delta``, ``message_stop``). Errors come in
Anthropic's shape (``llm.api.errors``). Tool use is not supported yet: a 400 naming ``tools``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from llm.api.openai import _number, body, sse_lines
from llm.auth import current_user
from llm.chat import ActiveTurn
from llm.errors import BadRequest, PayloadTooLarge
from llm.server import on_disconnect

blueprint = Blueprint("anthropic", __name__, url_prefix="/v1/messages")
NOT_YET = ("tools", "tool_choice", "thinking", "mcp_servers", "container")
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "cancelled": "end_turn"}


def _text(content: Any, where: str) -> str:
    """A message's or the system prompt's text: a string, or a list of text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(block, dict) and block.get("type") == "text"
                                         and isinstance(block.get("text"), str) for block in content):
        return "".join(block["text"] for block in content)
    raise BadRequest(f"{where}: only text content (a string or text blocks) is supported.", param=where)


def _messages(data: dict) -> list[dict[str, str]]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list.", param="messages")
    converted = []
    if data.get("system") is not None:
        converted.append({"role": "system", "content": _text(data["system"], "system")})
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise BadRequest(f"messages[{index}].role must be user or assistant.", param=f"messages[{index}]")
        converted.append({"role": message["role"], "content": _text(message.get("content"),
                                                                     f"messages[{index}].content")})
    return converted


def _sampling(data: dict) -> dict[str, Any]:
    for name in NOT_YET:
        if data.get(name):
            raise BadRequest(f"'{name}' is not supported by this service yet.", param=name)
    max_tokens = _number(data, "max_tokens", 1, 1 << 20, True)
    if max_tokens is None:
        raise BadRequest("'max_tokens' is required.", param="max_tokens")
    stops = data.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)):
        raise BadRequest("'stop_sequences' must be a list of non-empty strings.", param="stop_sequences")
    return {"max_tokens": max_tokens, "stop": stops, "temperature": _number(data, "temperature", 0, 1),
            "top_p": _number(data, "top_p", 0.0001, 1), "top_k": _number(data, "top_k", 0, 1 << 20, True)}


def _start(data: dict) -> ActiveTurn:
    name = data.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' (a personality name) is required.", param="model")
    sampling, messages = _sampling(data), _messages(data)
    try:
        return current_app.extensions["llm"].chat.start_messages(name, messages, sampling=sampling,
                                                                 channel="anthropic", user=current_user())
    except PayloadTooLarge as error:
        raise BadRequest(error.message, param="messages") from None


def _stop(turn: ActiveTurn, stops: list[str] | None) -> tuple[str, str | None]:
    """Anthropic's stop_reason, and the stop sequence that ended the answer when one did."""
    reason = turn.handle.finish_reason or "stop"
    if reason == "stop" and stops:
        return "stop_sequence", None  # which one matched is not tracked by the engine's text stream
    return STOP_REASONS.get(reason, "end_turn"), None


def _usage(turn: ActiveTurn) -> dict[str, int]:
    usage = turn.handle.usage
    return {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens}


@blueprint.post("")
def messages():
    data = body()
    turn = _start(data)
    on_disconnect(turn.cancel)
    ident = f"msg_{uuid.uuid4().hex}"
    if data.get("stream"):
        return Response(sse_lines(_events(turn, ident, data), named=True), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text = "".join(turn.pieces())
    finally:
        turn.cancel()
    reason, sequence = _stop(turn, data.get("stop_sequences"))
    return jsonify({"id": ident, "type": "message", "role": "assistant", "model": data["model"],
                    "content": [{"type": "text", "text": text}], "stop_reason": reason, "stop_sequence": sequence,
                    "usage": _usage(turn)})


def _events(turn: ActiveTurn, ident: str, data: dict) -> Iterator[dict]:
    message = {"id": ident, "type": "message", "role": "assistant", "model": data["model"], "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
    yield {"type": "message_start", "message": message}
    yield {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    try:
        for piece in turn.pieces():
            yield {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
    finally:
        turn.cancel()
    yield {"type": "content_block_stop", "index": 0}
    reason, sequence = _stop(turn, data.get("stop_sequences"))
    yield {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
           "usage": {"output_tokens": turn.handle.usage.completion_tokens}}
    yield {"type": "message_stop"}


@blueprint.post("/count_tokens")
def count_tokens():
    """Tokens the messages take for that personality's model, as the model reads them."""
    data = body()
    llm = current_app.extensions["llm"]
    personality = llm.personalities.get(data.get("model") if isinstance(data.get("model"), str) else "")
    messages = _messages(data)
    if not any(message["role"] == "system" for message in messages):
        messages.insert(0, {"role": "system", "content": personality.system_prompt})
    return jsonify({"input_tokens": llm.engine.count_tokens(llm.specs(personality), messages)})


def error_body(message: str, status: int) -> dict:
    """Anthropic's error shape."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
    return {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": message}}

