"""Tool (function) calling: the tools a client offers, the format the model reads and writes them in, the grammar
that makes every call valid, and the reader that turns the answer back into text or calls.

The format is the model's own where its chat template shows one we know (``template_tool_format``), else the
generic Hermes one:

* ``hermes`` (Qwen 2.5/3, Hermes, SmolLM3; and every model without a format of its own, which can follow it from
  the instructions): the system prompt lists the tools' JSON Schemas inside ``<tools>`` tags; a call is
  ``<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>``, one block per call
  (separated by a newline); results come back in the next user turn inside ``<tool_response>`` tags.
* ``llama3`` (Llama 3.1, 3.2, 3.3): Meta's JSON tool calling: the system prompt lists the tools and asks for
  ``{"name": "get_weather", "parameters": {"city": "Paris"}}`` as the whole answer, one call per turn; each result
  comes back in an ``ipython`` turn.
* ``mistral`` (Mistral 7B v0.3, Nemo, Small, Large): the model's own template writes the tools
  (``[AVAILABLE_TOOLS]...[/AVAILABLE_TOOLS]``), past calls and results (``[TOOL_RESULTS]...``) from structured
  messages, with its control tokens; a call is the ``[TOOL_CALLS]`` control token, which only the grammar can
  write (by token id), then ``[{"name": "get_weather", "arguments": {"city": "Paris"}}]``. Its template wants
  9-character call ids: the client's ids are mapped to such ids by a hash (``template_call_id``).

The model's answer is constrained by an llguidance grammar: with ``auto`` it chooses between free text and calls;
with ``required`` or a named tool it must call; the name is always one of the tools and the arguments always match
that tool's schema (checked again after generation, since a schema the grammar can only approximate is enforced as
a superset).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from llm.errors import BadRequest, ConfigError, GenerationFailed, IncompleteOutput
from llm.schema_support import check_schema, normalise, validate_output

MAX_TOOLS = 128
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Strict JSON without whitespace (no padding forever); lenient: a keyword the grammar cannot enforce becomes a
# superset there and is enforced by validation instead of refusing the tool.
_JSON_OPTIONS = {"whitespace_flexible": False, "coerce_one_of": True, "lenient": True}
_RULES = {"auto": "Call a function only when it helps; otherwise answer in plain text.",
          "required": "You must call at least one function."}


@dataclass(frozen=True)
class ToolFormat:
    """How a model family reads tools and writes calls.

    Calls are ``special + prefix + call (separator call)* + suffix``, a call ``head + name + middle + arguments +
    tail``; ``special`` is a control token only the grammar writes (it reads as nothing in the answer's text). An
    answer is calls exactly when its text starts with ``opening``, and free text may not match ``not_text`` (a
    regex), so the reader can tell the two apart from the first characters."""

    name: str
    head: str
    middle: str
    tail: str
    separator: str
    opening: str
    not_text: str
    instructions: str  # with {tools} (one JSON object per tool) and {rule}
    tools_indent: int | None = None
    parallel: bool = True  # the family can make several calls in one answer
    results_role: str | None = None  # each result in its own turn of this role; None: one user turn of results
    prefix: str = ""
    suffix: str = ""
    special: str | None = None
    in_template: bool = False  # the chat template writes tools, calls and results (structured messages)

    def call_text(self, name: str, arguments: str) -> str:
        """A call as the model writes it (for assistant turns in the history); arguments re-encoded compactly."""
        try:
            arguments = json.dumps(json.loads(arguments), ensure_ascii=False, separators=(",", ":"))
        except ValueError:
            pass  # a client's malformed arguments are shown as they were
        return f"{self.head}{name}{self.middle}{arguments}{self.tail}"

    def assistant_text(self, content: str | None, calls: Sequence[tuple[str, str, str]]) -> str:
        """An assistant turn with calls, as the model would have written it."""
        blocks = self.separator.join(self.call_text(name, arguments) for name, arguments, _ in calls)
        return f"{content}\n{blocks}" if content else blocks

    def result_turns(self, results: Sequence[str], text: str = "") -> list[dict[str, str]]:
        """Tool results (and any text the user wrote with them) as the turns that bring them back to the model."""
        if self.results_role is not None:
            turns = [{"role": self.results_role, "content": result} for result in results]
            return turns + ([{"role": "user", "content": text}] if text else [])
        shown = "\n".join(f"<tool_response>\n{result}\n</tool_response>" for result in results)
        return [{"role": "user", "content": "\n".join(filter(None, [shown, text]))}]


HERMES = ToolFormat(
    "hermes", head='<tool_call>\n{"name": "', middle='", "arguments": ', tail="}\n</tool_call>", separator="\n",
    opening="<tool_call>\n", not_text="<tool_call>(?s:.*)",
    instructions=("You may call functions to help with the user's request. The functions are described by JSON "
                  "Schemas inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n{rule} To call a function, answer "
                  'with one block per call:\n<tool_call>\n{{"name": "<function name>", "arguments": <arguments as a '
                  "JSON object>}}\n</tool_call>\nResults come back inside <tool_response></tool_response> tags."))
# Meta's wording for tools in the system prompt (their template's tools_in_user_message=false variant).
LLAMA3 = ToolFormat(
    "llama3", head='{"name": "', middle='", "parameters": ', tail="}", separator="; ", opening='{"name": "',
    not_text='[ \\t\\n]*\\{(?s:.*)', tools_indent=4, parallel=False, results_role="ipython",
    instructions=("You have access to the following functions. To call a function, please respond with JSON for a "
                  'function call. Respond in the format {{"name": function name, "parameters": dictionary of argument '
                  "name and its value}}. Do not use variables.\n\n{tools}\n\n{rule}"))
# Mistral's template lists the tools itself; the system prompt gains only the rule.
MISTRAL = ToolFormat(
    "mistral", head='{"name": "', middle='", "arguments": ', tail="}", separator=", ", opening='[{"name": "',
    not_text='[ \\t\\n]*\\[[ \\t\\n]*\\{(?s:.*)', instructions="{rule}", prefix="[", suffix="]",
    special="[TOOL_CALLS]", in_template=True)
TOOL_FORMATS = {form.name: form for form in (HERMES, LLAMA3, MISTRAL)}


def tool_format(name: str) -> ToolFormat:
    """The named format (LLM_TOOL_FORMAT, or what the model's template showed)."""
    try:
        return TOOL_FORMATS[name]
    except KeyError:
        raise ConfigError(f"Unknown tool format {name!r}; known: {', '.join(TOOL_FORMATS)}.") from None


def template_tool_format(template: str | None) -> str:
    """The tool format a chat template was written for, by the markers it writes; ``hermes`` (the generic one)
    when it shows none we know. Checked in this order because Hermes fine-tunes of Llama 3.1 keep Llama's headers."""
    template = template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "<|start_header_id|>" in template and '"parameters"' in template:
        return "llama3"
    if "[TOOL_CALLS]" in template and "[AVAILABLE_TOOLS]" in template:
        return "mistral"
    return "hermes"


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
    if parameters.get("type", "object") != "object":
        raise BadRequest(f"{where}: the parameters must describe an object (\"type\": \"object\").", param=where)
    parameters = {"type": "object", **parameters}  # arguments are always an object, as every client expects
    check_schema(parameters)
    return Tool(name, description or "", parameters)


@dataclass(frozen=True)
class ToolUse:
    """The tools of one request and how the model may use them.

    ``choice``: ``auto`` (text or calls), ``required`` (at least one call) or the name of the one tool to call;
    ``parallel``: several calls in one answer (where the format allows); ``format``: the model's (set by the chat
    service once it knows the model)."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = True
    format: ToolFormat = HERMES

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

    def formatted(self, form: ToolFormat) -> ToolUse:
        return replace(self, format=form)

    def system_text(self) -> str:
        """What the system prompt gains: the tools (unless the template lists them) and how to call them."""
        indent = self.format.tools_indent
        listed = ("\n\n" if indent else "\n").join(json.dumps(spec, ensure_ascii=False, indent=indent)
                                                  for spec in self.definitions())
        rule = _RULES.get(self.choice, f"You must call the function {self.choice}.")
        return self.format.instructions.format(tools=listed, rule=rule)

    def definitions(self) -> list[dict]:
        """The tools as OpenAI writes them (and chat templates read them); no empty descriptions."""
        return [{"type": "function", "function": {"name": tool.name, **(
            {"description": tool.description} if tool.description else {}), "parameters": tool.parameters}}
            for tool in self.tools]

    def grammar(self) -> str:
        """The Lark grammar of a valid answer: free text (auto only) or calls to these tools. The format's control
        token is the rule ``special``, which the engine defines by the model's token id (``GrammarConstraint``)."""
        form = self.format
        callable_tools = self.tools if self.choice in ("auto", "required") else (self.tool(self.choice),)
        rules = []
        for index, tool in enumerate(callable_tools):
            schema = {**normalise(tool.parameters), "x-guidance": _JSON_OPTIONS}
            rules.append(f"call_{index}: {json.dumps(form.head + tool.name + form.middle)} args_{index} "
                         f"{json.dumps(form.tail)}")
            rules.append(f"args_{index}: %json{json.dumps(schema, ensure_ascii=False)}")
        calls = f"call ({json.dumps(form.separator)} call)*" if self.parallel and form.parallel else "call"
        # After a control token, SentencePiece vocabularies (Mistral 7B v0.3) write " [": one space may come first.
        calls = " ".join(filter(None, ['special " "?' if form.special else "", form.prefix and json.dumps(form.prefix),
                                       calls, form.suffix and json.dumps(form.suffix)]))
        start = "TEXT | calls" if self.choice == "auto" else "calls"
        return "\n".join([f"start: {start}", f"calls: {calls}",
                          "call: " + " | ".join(f"call_{i}" for i in range(len(callable_tools))),
                          f"TEXT: /(?s:.+)/ & ~/{form.not_text}/", *rules])

    def parse(self, text: str, finish_reason: str | None) -> tuple[str | None, list[ToolCall]]:
        """The whole answer as (text, calls); calls are validated against their tools' schemas."""
        reader = CallReader(self.format)
        for _ in reader.feed(text):
            pass
        return reader.finish(self, finish_reason)


def model_history(messages: Sequence[dict], form: ToolFormat, tools: ToolUse | None = None) -> list[dict]:
    """Client-held history with tool use (messages marked with ``calls`` or ``results`` by the API layer) as the
    model's own turns; for a format its template writes, structured turns (and the tools on the first)."""
    if form.in_template:
        return _template_history(messages, tools)
    turns: list[dict[str, str]] = []
    for message in messages:
        if message.get("calls"):
            turns.append({"role": "assistant", "content": form.assistant_text(message["content"], message["calls"])})
        elif message.get("results"):
            turns += form.result_turns([text for _, text in message["results"]], message["content"])
        else:
            turns.append({"role": message["role"], "content": message["content"]})
    return turns


def _template_history(messages: Sequence[dict], tools: ToolUse | None) -> list[dict]:
    """Turns as Hugging Face's chat templates take them: ``tool_calls`` on assistant turns (arguments as objects),
    one ``tool`` turn per result with its call's ``tool_call_id``. A call or result without an id pairs up by
    order (the n-th result answers the n-th call)."""
    turns: list[dict] = []
    made = answered = 0
    for message in messages:
        if message.get("calls"):
            calls = []
            for name, arguments, ident in message["calls"]:
                calls.append({"id": template_call_id(ident or f"#{made}"), "type": "function",
                              "function": {"name": name, "arguments": _arguments_value(arguments)}})
                made += 1
            turns.append({"role": "assistant", "content": message["content"], "tool_calls": calls})
        elif message.get("results"):
            for ident, text in message["results"]:
                ident = template_call_id(ident or f"#{answered}")
                turns.append({"role": "tool", "content": text, "tool_call_id": ident})
                answered += 1
            if message["content"]:
                turns.append({"role": "user", "content": message["content"]})
        else:
            turns.append({"role": message["role"], "content": message["content"]})
    if tools is not None and turns:
        turns[0] = {**turns[0], "tools": tools.definitions()}
    return turns


def _arguments_value(arguments: str) -> Any:
    """A call's arguments as the object templates expect (a client's malformed JSON stays the text it was)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def client_call_id(ident: Any) -> str:
    """A call id from a client's history ("" when it sent none: calls and results then pair up by order)."""
    return ident if isinstance(ident, str) else ""


def template_call_id(ident: str) -> str:
    """A client's call id as the 9 letters and digits Mistral's template insists on; the same id always maps to
    the same one, so a result finds its call and the rendering stays prefix-stable across turns."""
    return hashlib.sha256(ident.encode()).hexdigest()[:9]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CallReader:
    """Reads an answer as it streams and says, as early as it can, whether it is text or calls.

    ``feed`` yields events: ``("text", piece)``, ``("call", index, id, name)`` when a call's name is known, and
    ``("arguments", index, piece)`` as its arguments stream (the grammar fixes the layout, so no guessing)."""

    def __init__(self, form: ToolFormat):
        self.format = form
        self.text = ""
        self.kind: str | None = None  # "text" or "calls" once known
        self.calls: list[list[str]] = []  # [id, name, arguments]
        self._position = len(form.prefix)
        self._state = "head"
        self._depth, self._in_string, self._escaped = 0, False, False  # where the arguments' JSON stands

    def _json_end(self, text: str) -> int | None:
        """Where the arguments' JSON object ends in ``text`` (continuing from earlier pieces), or None if it goes on.
        Brace counting is enough: the grammar made it valid JSON, and a tail may itself be a brace."""
        for index, char in enumerate(text):
            if self._in_string:
                self._escaped, self._in_string = (False, True) if self._escaped else (char == "\\", char != '"')
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return index + 1
        return None

    def feed(self, piece: str) -> Iterator[tuple]:
        self.text += piece
        if self.kind is None:
            opening = self.format.opening
            lead = 1 if self.format.special and self.text.startswith(" ") else 0  # the grammar's optional space
            text = self.text[lead:]
            if len(text) < len(opening) and opening.startswith(text):
                return
            self.kind = "calls" if text.startswith(opening) else "text"
            self._position += lead
            piece = self.text
        if self.kind == "text":
            yield ("text", piece)
            return
        yield from self._read_calls()

    def _read_calls(self) -> Iterator[tuple]:
        head, middle, tail, separator = self.format.head, self.format.middle, self.format.tail, self.format.separator
        while True:
            rest = self.text[self._position:]
            if self._state == "head":
                if len(rest) < len(head):
                    return
                self._position, self._state = self._position + len(head), "name"
            elif self._state == "name":
                end = rest.find('"')
                if end < 0:
                    return
                self.calls.append([new_call_id(), rest[:end], ""])
                self._position, self._state = self._position + end + len(middle), "middle"
                yield ("call", len(self.calls) - 1, self.calls[-1][0], self.calls[-1][1])
            elif self._state == "middle":
                if len(self.text) < self._position:
                    return
                self._state = "arguments"
            elif self._state == "arguments":
                end = self._json_end(rest)
                ready = rest if end is None else rest[:end]
                if ready:
                    self.calls[-1][2] += ready
                    yield ("arguments", len(self.calls) - 1, ready)
                self._position += len(ready)
                if end is None:
                    return
                self._state = "tail"
            elif self._state == "tail":
                if len(rest) < len(tail):
                    return
                self._position, self._state = self._position + len(tail), "between"
            elif self._state == "between":
                if not rest:
                    return
                if self.format.suffix and rest.startswith(self.format.suffix):
                    self._position, self._state = self._position + len(self.format.suffix), "end"
                else:
                    self._position, self._state = self._position + len(separator), "head"
            else:  # after the suffix the grammar allows nothing
                return

    def close(self) -> Iterator[tuple]:
        """At the end of the stream: a short answer still undecided (say ``<to``) was text after all."""
        if self.kind is None and self.text:
            self.kind = "text"
            yield ("text", self.text)

    def finish(self, tools: ToolUse, finish_reason: str | None) -> tuple[str | None, list[ToolCall]]:
        """(text, calls) once the answer has ended; a call cut off by max_tokens is an error, never half sent."""
        if self.kind != "calls":
            return self.text, []
        if self._state != ("end" if self.format.suffix else "between"):
            raise IncompleteOutput("The tool call was not complete within max_tokens; raise max_tokens.")
        calls = []
        for ident, name, arguments in self.calls:
            try:
                validate_output(tools.tool(name).parameters, arguments)
            except GenerationFailed as error:
                raise GenerationFailed(f"The call to {name}: {error.message}") from None
            calls.append(ToolCall(ident, name, arguments))
        return None, calls
