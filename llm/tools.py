"""Tool (function) calling: the tools a client offers, the format the model reads and writes them in, the grammar
that makes every call valid, and the reader that turns the answer back into text or calls.

The format is the Hermes one (Qwen 2.5/3, Hermes and SmolLM3 models are trained on it; a model that was not can
still follow it from the instructions). The system prompt gains the tools' JSON Schemas inside ``<tools>`` tags;
a call is written as::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call (parallel calls are separated by a newline), and results come back in the next user turn
inside ``<tool_response>`` tags. The model's answer is constrained by an llguidance grammar: with ``auto`` it
chooses between free text and calls; with ``required`` or a named tool it must call; the name is always one of
the tools and the arguments always match that tool's schema (checked again after generation, since a schema the
grammar can only approximate is enforced as a superset).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm.errors import BadRequest, GenerationFailed, IncompleteOutput
from llm.schema_support import check_schema, normalise, validate_output

MAX_TOOLS = 128
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
OPEN = "<tool_call>\n"
HEAD = OPEN + '{"name": "'
MIDDLE = '", "arguments": '
TAIL = "}\n</tool_call>"
SEPARATOR = "\n"
# Strict JSON without whitespace (no padding forever); lenient: a keyword the grammar cannot enforce becomes a
# superset there and is enforced by validation instead of refusing the tool.
_JSON_OPTIONS = {"whitespace_flexible": False, "coerce_one_of": True, "lenient": True}
_INSTRUCTIONS = ("You may call functions to help with the user's request. The functions are described by JSON "
                 "Schemas inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n{rule} To call a function, answer with "
                 'one block per call:\n<tool_call>\n{{"name": "<function name>", "arguments": <arguments as a JSON '
                 "object>}}\n</tool_call>\nResults come back inside <tool_response></tool_response> tags.")
_RULES = {"auto": "Call a function only when it helps; otherwise answer in plain text.",
          "required": "You must call at least one function."}


@dataclass(frozen=True)
class Tool:
    """One function a client offers: its name, what it does, and the JSON Schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: ``arguments`` is the JSON text, already validated against the tool's schema."""

    id: str
    name: str
    arguments: str


def check_tool(name: Any, description: Any, parameters: Any, where: str) -> Tool:
    """A tool from a client's request, or a 400 naming what is wrong with it."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadRequest(f"{where}: the name must be 1-64 letters, digits, '_' or '-'.", param=where)
    if description is not None and not isinstance(description, str):
        raise BadRequest(f"{where}: the description must be a string.", param=where)
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where}: the parameters must be a JSON Schema object.", param=where)
    check_schema(parameters)
    return Tool(name, description or "", parameters)


@dataclass(frozen=True)
class ToolUse:
    """The tools of one request and how the model may use them.

    ``choice``: ``auto`` (text or calls), ``required`` (at least one call) or the name of the one tool to call;
    ``parallel``: several calls in one answer."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = True

    def __post_init__(self):
        if len(self.tools) > MAX_TOOLS:
            raise BadRequest(f"At most {MAX_TOOLS} tools may be offered.", param="tools")
        names = [tool.name for tool in self.tools]
        if len(set(names)) != len(names):
            raise BadRequest("Tool names must be unique.", param="tools")
        if self.choice not in ("auto", "required") and self.choice not in names:
            raise BadRequest(f"tool_choice names {self.choice!r}, which is not among the tools.", param="tool_choice")

    def tool(self, name: str) -> Tool:
        return next(tool for tool in self.tools if tool.name == name)

    def system_text(self) -> str:
        """What the system prompt gains: the tools and how to call them."""
        listed = "\n".join(json.dumps({"type": "function", "function": {
            "name": tool.name, "description": tool.description, "parameters": tool.parameters}},
            ensure_ascii=False) for tool in self.tools)
        rule = _RULES.get(self.choice, f"You must call the function {self.choice}.")
        return _INSTRUCTIONS.format(tools=listed, rule=rule)

    def grammar(self) -> str:
        """The Lark grammar of a valid answer: free text (auto only) or calls to these tools."""
        callable_tools = self.tools if self.choice in ("auto", "required") else (self.tool(self.choice),)
        rules = []
        for index, tool in enumerate(callable_tools):
            schema = {**normalise(tool.parameters), "x-guidance": _JSON_OPTIONS}
            rules.append(f"call_{index}: {json.dumps(HEAD + tool.name + MIDDLE)} args_{index} {json.dumps(TAIL)}")
            rules.append(f"args_{index}: %json{json.dumps(schema, ensure_ascii=False)}")
        calls = f"call ({json.dumps(SEPARATOR)} call)*" if self.parallel else "call"
        start = "TEXT | calls" if self.choice == "auto" else "calls"
        return "\n".join([f"start: {start}", f"calls: {calls}",
                          "call: " + " | ".join(f"call_{i}" for i in range(len(callable_tools))),
                          r"TEXT: /(?s:.+)/ & ~/<tool_call>(?s:.*)/", *rules])

    def parse(self, text: str, finish_reason: str | None) -> tuple[str | None, list[ToolCall]]:
        """The whole answer as (text, calls); calls are validated against their tools' schemas."""
        reader = CallReader()
        for _ in reader.feed(text):
            pass
        return reader.finish(self, finish_reason)


def call_text(name: str, arguments: str) -> str:
    """A call as the model writes it (for assistant turns in the history); arguments are re-encoded compactly."""
    try:
        arguments = json.dumps(json.loads(arguments), ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        pass  # a client's malformed arguments are shown as they were
    return f"{HEAD}{name}{MIDDLE}{arguments}{TAIL}"


def assistant_text(content: str | None, calls: Sequence[tuple[str, str]]) -> str:
    """An assistant turn with calls, as the model would have written it."""
    blocks = SEPARATOR.join(call_text(name, arguments) for name, arguments in calls)
    return f"{content}\n{blocks}" if content else blocks


def results_text(results: Sequence[str]) -> str:
    """Tool results, as the user turn that brings them back to the model."""
    return "\n".join(f"<tool_response>\n{result}\n</tool_response>" for result in results)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CallReader:
    """Reads an answer as it streams and says, as early as it can, whether it is text or calls.

    ``feed`` yields events: ``("text", piece)``, ``("call", index, id, name)`` when a call's name is known, and
    ``("arguments", index, piece)`` as its arguments stream (the grammar fixes the layout, so no guessing)."""

    def __init__(self):
        self.text = ""
        self.kind: str | None = None  # "text" or "calls" once known
        self.calls: list[list[str]] = []  # [id, name, arguments]
        self._position = 0
        self._state = "head"

    def feed(self, piece: str) -> Iterator[tuple]:
        self.text += piece
        if self.kind is None:
            if len(self.text) < len(OPEN) and OPEN.startswith(self.text):
                return
            self.kind = "calls" if self.text.startswith(OPEN) else "text"
            piece = self.text
        if self.kind == "text":
            yield ("text", piece)
            return
        yield from self._read_calls()

    def _read_calls(self) -> Iterator[tuple]:
        while True:
            rest = self.text[self._position:]
            if self._state == "head":
                if len(rest) < len(HEAD):
                    return
                self._position, self._state = self._position + len(HEAD), "name"
            elif self._state == "name":
                end = rest.find('"')
                if end < 0:
                    return
                self.calls.append([new_call_id(), rest[:end], ""])
                self._position, self._state = self._position + end + len(MIDDLE), "middle"
                yield ("call", len(self.calls) - 1, self.calls[-1][0], self.calls[-1][1])
            elif self._state == "middle":
                if len(self.text) < self._position:
                    return
                self._state = "arguments"
            elif self._state == "arguments":
                end = rest.find(TAIL)
                ready = rest[:end] if end >= 0 else rest[:len(rest) - _held_back(rest)]
                if ready:
                    self.calls[-1][2] += ready
                    yield ("arguments", len(self.calls) - 1, ready)
                self._position += len(ready)
                if end < 0:
                    return
                self._position, self._state = self._position + len(TAIL), "between"
            else:  # between calls
                if not rest:
                    return
                self._position, self._state = self._position + len(SEPARATOR), "head"

    def close(self) -> Iterator[tuple]:
        """At the end of the stream: a short answer still undecided (say ``<to``) was text after all."""
        if self.kind is None and self.text:
            self.kind = "text"
            yield ("text", self.text)

    def finish(self, tools: ToolUse, finish_reason: str | None) -> tuple[str | None, list[ToolCall]]:
        """(text, calls) once the answer has ended; a call cut off by max_tokens is an error, never half sent."""
        if self.kind != "calls":
            return self.text, []
        if self._state != "between":
            raise IncompleteOutput("The tool call was not complete within max_tokens; raise max_tokens.")
        calls = []
        for ident, name, arguments in self.calls:
            try:
                validate_output(tools.tool(name).parameters, arguments)
            except GenerationFailed as error:
                raise GenerationFailed(f"The call to {name}: {error.message}") from None
            calls.append(ToolCall(ident, name, arguments))
        return None, calls


def _held_back(text: str) -> int:
    """How many trailing characters might be the start of the call's closing tail (held until disambiguated)."""
    for size in range(min(len(TAIL), len(text)), 0, -1):
        if TAIL.startswith(text[-size:]):
            return size
    return 0
