"""The Anthropic Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) with personalities as models.

Clients built on the official ``anthropic`` SDK work unchanged: the same keys (the SDK sends ``x-api-key``), a
system prompt (string or text blocks), multi-turn messages with text content blocks, ``stop_sequences``,
``temperature``/``top_p``/``top_k``, ``max_tokens`` (required, as in Anthropic's API) and streaming as Anthropic's
server-sent events (``message_start``, ``content_block_delta``, ``message_delta``, ``message_stop``) and tool use
(``tools``, ``tool_choice``, ``tool_use``/``tool_result`` blocks in the history, ``input_json_delta`` events), with
calls constrained like ``/v1/chat/completions``'s (``llm.engine.tools``). Errors come in Anthropic's shape
(``llm.web.api.errors``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from llm.conversation.service import ActiveTurn
from llm.engine.tools import CallReader, ToolUse, check_tool, client_call_id
from llm.errors import BadRequest, PayloadTooLarge
from llm.web.api.openai import _number, body
from llm.web.api.openai_output import sse_lines
from llm.web.auth import current_user
from llm.web.server import on_disconnect

blueprint = Blueprint("anthropic", __name__, url_prefix="/v1/messages")
NOT_YET = ("thinking", "mcp_servers", "container")
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "cancelled": "end_turn"}
CHOICES = {"auto": "auto", "any": "required"}


def _text(content: Any, where: str) -> str:
    """The system prompt's text: a string, or a list of text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(_is_text(block) for block in content):
        return "".join(block["text"] for block in content)
    raise BadRequest(f"{where}: only text content (a string or text blocks) is supported.", param=where)


def _is_text(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)


def _message(message: Any, where: str) -> dict[str, Any]:
    """One message marked for the chat service: text blocks, an assistant's ``tool_use`` blocks as its calls, a
    user's ``tool_result`` blocks as results (which the RAG preprocessor leaves alone)."""
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise BadRequest(f"{where}.role must be user or assistant.", param=where)
    content = message.get("content")
    if isinstance(content, str):
        return {"role": message["role"], "content": content}
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or a list of blocks.", param=f"{where}.content")
    text, calls, results = "", [], []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if _is_text(block):
            text += block["text"]
        elif kind == "tool_use" and message["role"] == "assistant" and isinstance(block.get("name"), str):
            calls.append((block["name"], json.dumps(block.get("input") or {}, ensure_ascii=False),
                          client_call_id(block.get("id"))))
        elif kind == "tool_result" and message["role"] == "user":
            result = block.get("content") or ""
            result = result if isinstance(result, str) else _text(result, f"{where}.content")
            result = f"Error: {result}" if block.get("is_error") else result
            results.append((client_call_id(block.get("tool_use_id")), result))
        else:
            raise BadRequest(f"{where}.content: only text, tool_use (assistant) and tool_result (user) blocks are "
                             "supported.", param=f"{where}.content")
    if calls:
        return {"role": "assistant", "content": text, "calls": calls}
    if results:
        return {"role": "user", "content": text, "results": results}
    return {"role": message["role"], "content": text}


def _messages(data: dict) -> list[dict[str, Any]]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list.", param="messages")
    converted = []
    if data.get("system") is not None:
        converted.append({"role": "system", "content": _text(data["system"], "system")})
    return converted + [_message(message, f"messages[{index}]") for index, message in enumerate(messages)]


def _tools(data: dict) -> ToolUse | None:
    """Anthropic's ``tools`` and ``tool_choice`` (auto, any, tool, none; ``disable_parallel_tool_use``)."""
    tools, choice = data.get("tools"), data.get("tool_choice") or {"type": "auto"}
    if not tools:
        return None
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be a list.", param="tools")
    offered = [check_tool(tool.get("name"), tool.get("description"), tool.get("input_schema"), f"tools[{index}]")
               if isinstance(tool, dict) else check_tool(None, None, None, f"tools[{index}]")
               for index, tool in enumerate(tools)]
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "none":
        return None
    if kind not in ("auto", "any", "tool"):
        raise BadRequest("tool_choice.type must be auto, any, tool or none.", param="tool_choice")
    return ToolUse(tuple(offered), choice.get("name") if kind == "tool" else CHOICES[kind],
                   not choice.get("disable_parallel_tool_use"))


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
    sampling, messages, tools = _sampling(data), _messages(data), _tools(data)
    knowledge = data.get("knowledge", False)
    if not isinstance(knowledge, bool):
        raise BadRequest("'knowledge' must be true or false.", param="knowledge")
    try:
        return current_app.extensions["llm"].chat.start_messages(name, messages, sampling=sampling,
                                                                 channel="anthropic", user=current_user(),
                                                                 tools=tools, knowledge=knowledge)
    except PayloadTooLarge as error:
        raise BadRequest(error.message, param="messages") from None


def _stop(turn: ActiveTurn, stops: list[str] | None) -> tuple[str, str | None]:
    """Anthropic's stop_reason, and the client's stop sequence that ended the answer when one did (the chat
    format's own end-of-turn string is an ordinary end_turn)."""
    reason = turn.handle.finish_reason or "stop"
    matched = turn.handle.stop_sequence
    if reason == "stop" and matched is not None and matched in (stops or ()):
        return "stop_sequence", matched
    return STOP_REASONS.get(reason, "end_turn"), None


def _usage(turn: ActiveTurn) -> dict[str, int]:
    usage = turn.handle.usage
    return {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens}


def _tool_use(ident: str, name: str, arguments: str | None = None) -> dict:
    """A tool_use block (the call id in Anthropic's spelling; ``input`` empty while it streams)."""
    return {"type": "tool_use", "id": "toolu_" + ident.removeprefix("call_"), "name": name,
            "input": json.loads(arguments) if arguments is not None else {}}


@blueprint.post("")
def messages():
    data = body()
    turn = _start(data)
    tools = turn.tools  # in the model's format
    on_disconnect(turn.cancel)
    ident = f"msg_{uuid.uuid4().hex}"
    if data.get("stream"):
        return Response(sse_lines(_events(turn, ident, data, tools), named=True), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text = "".join(turn.pieces())
    finally:
        turn.cancel()
    reason, sequence = _stop(turn, data.get("stop_sequences"))
    text, calls = tools.parse(text, turn.handle.finish_reason) if tools is not None else (text, [])
    content = [{"type": "text", "text": text}] if not calls else []
    content += [_tool_use(call.id, call.name, call.arguments) for call in calls]
    return jsonify({"id": ident, "type": "message", "role": "assistant", "model": data["model"], "content": content,
                    "stop_reason": "tool_use" if calls else reason, "stop_sequence": sequence,
                    "usage": _usage(turn)})


def _events(turn: ActiveTurn, ident: str, data: dict, tools: ToolUse | None) -> Iterator[dict]:
    message = {"id": ident, "type": "message", "role": "assistant", "model": data["model"], "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
    yield {"type": "message_start", "message": message}
    reader = CallReader(tools.format) if tools is not None else None
    blocks = _Blocks()
    try:
        for piece in turn.pieces():
            yield from blocks.events(reader.feed(piece) if reader is not None else [("text", piece)])
    finally:
        turn.cancel()
    reason, sequence = _stop(turn, data.get("stop_sequences"))
    if reader is not None:
        yield from blocks.events(reader.close())
        if reader.finish(tools, turn.handle.finish_reason)[1]:  # validates every call
            reason = "tool_use"
    yield from blocks.finish()
    yield {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
           "usage": {"output_tokens": turn.handle.usage.completion_tokens}}
    yield {"type": "message_stop"}


class _Blocks:
    """Turns text and call events into Anthropic's numbered content blocks (start, deltas, stop)."""

    def __init__(self):
        self.index, self.kind = -1, None

    def events(self, events) -> Iterator[dict]:
        for event in events:
            if event[0] == "text":
                if self.kind != "text":
                    yield from self._open({"type": "text", "text": ""}, "text")
                yield {"type": "content_block_delta", "index": self.index,
                       "delta": {"type": "text_delta", "text": event[1]}}
            elif event[0] == "call":
                yield from self._open(_tool_use(event[2], event[3]), "tool_use")
            else:
                yield {"type": "content_block_delta", "index": self.index,
                       "delta": {"type": "input_json_delta", "partial_json": event[2]}}

    def _open(self, block: dict, kind: str) -> Iterator[dict]:
        yield from self.close()
        self.index, self.kind = self.index + 1, kind
        yield {"type": "content_block_start", "index": self.index, "content_block": block}

    def close(self) -> Iterator[dict]:
        if self.kind is not None:
            yield {"type": "content_block_stop", "index": self.index}
            self.kind = None

    def finish(self) -> Iterator[dict]:
        """Close the last block (an answer with no text at all still gets its one empty text block)."""
        if self.index < 0:
            yield from self._open({"type": "text", "text": ""}, "text")
        yield from self.close()


@blueprint.post("/count_tokens")
def count_tokens():
    """Tokens the messages take for that personality's model, as the model reads them."""
    data = body()
    name = data.get("model") if isinstance(data.get("model"), str) else ""
    tokens = current_app.extensions["llm"].chat.count_message_tokens(name, _messages(data), _tools(data))
    return jsonify({"input_tokens": tokens})


def error_body(message: str, status: int) -> dict:
    """Anthropic's error shape."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error",
             429: "rate_limit_error", 503: "overloaded_error"}
    return {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": message}}

