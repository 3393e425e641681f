"""Chat formatting: messages to prompt text, from the GGUF's own template or from its architecture.

llama-cpp-python silently falls back to ``llama-2`` formatting when a GGUF has no ``tokenizer.chat_template``,
and the embedded Gemma model then answers ``[INST] <<SYS>>`` garbage. Here the file's template wins; without
one the family is chosen from ``general.architecture``; an unknown family without a template is a start-up
error unless ``LLM_CHAT_FORMAT`` names one, never a guess.

Renderings are prefix-stable (the prompt for turn N is a prefix of the prompt for turn N+1 up to the answer),
which is what lets the engine reuse a conversation's cache.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llm.engine.tools import template_tool_format
from llm.errors import ConfigError

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


# Stand-ins for the client's strings while a template renders: private-use characters no template writes, padded
# with a paragraph separator that trimming templates strip (so we know to strip the content the same way).
_PAD = "\u2029"
_SENTINEL = re.compile("\u2029?\ue000(\\d+)\ue001\u2029?")
# The same stand-in written by the template's ``tojson`` (Llama 3.1 writes tool results so, Mistral its calls and
# tool definitions): our ``tojson`` marks it with a different opening character, and the string goes in as JSON.
_JSON_SENTINEL = re.compile('"\u2029\ue002(\\d+)\ue001\u2029"')
_ANY_SENTINEL = re.compile(f"{_JSON_SENTINEL.pattern}|{_SENTINEL.pattern}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, separators: Any = None,
            sort_keys: bool = False) -> str:
    """``tojson`` as Hugging Face's chat templating defines it (key order kept, no HTML escaping), which is what
    the models were trained on; Jinja's own sorts keys and escapes ``<``. Stand-ins are marked as written by it."""
    text = json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    return text.replace("\ue000", "\ue002")


_IDENTIFIER = re.compile("[A-Za-z_][A-Za-z0-9_]{0,63}")


class _StandIns:
    """The client's strings of one rendering, each replaced by a numbered stand-in (recursively inside tool
    definitions and call arguments, so the template still sees mappings, lists and numbers where they were).
    Keys that are identifiers stay, so templates can still read ``tool.function.name``: no control marker is an
    identifier (markers are the vocabulary's non-alphanumeric texts), and ``tojson`` quotes them."""

    def __init__(self):
        self.values: list[str] = []

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            self.values.append(value)
            return f"{_PAD}\ue000{len(self.values) - 1}\ue001{_PAD}"
        if isinstance(value, dict):
            return {key if _IDENTIFIER.fullmatch(key) else self(key): self(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self(item) for item in value]
        return value  # numbers, booleans and null cannot spell a marker

    def message(self, message: Message) -> Message:
        """A message with its content (and, for the template-rendered tool formats, its calls' names and
        arguments) as stand-ins; call ids are ours (``llm.engine.tools``), so they stay as they are."""
        marked = {**message, "content": self(message.get("content") or "")}
        if message.get("tool_calls"):
            marked["tool_calls"] = [{**call, "function": self(call["function"])} for call in message["tool_calls"]]
        return marked

    def restore(self, match: re.Match) -> str:
        value = self.values[int(match[1] or match[2])]
        if match[1]:
            return json.dumps(value, ensure_ascii=False)  # exactly as the template's tojson writes it
        # where the template trimmed our padding it trims the content too, on that side only
        value = value if match.group().startswith(_PAD) else value.lstrip()
        return value if match.group().endswith(_PAD) else value.rstrip()


@dataclass(frozen=True)
class ChatFormat:
    """Renders messages to text; ``stops`` are extra stop strings for models whose end-of-turn is not EOG.

    A message may carry ``tool_calls``, ``tool_call_id`` and ``tools`` (the first message that has them gives the
    template its ``tools``), for tool formats the model's own template writes (``llm.engine.tools``); only template
    formats (``renders_tools``) take them."""

    name: str
    render: Callable[..., str]
    stops: tuple[str, ...] = ()
    tool_format: str = "hermes"  # how the model reads tools and writes calls (llm.tools)
    renders_tools: bool = False

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """The rendered prompt as ``(text, trusted)`` pieces: the template's own text is trusted (its turn markers
        become special tokens); every string a client wrote is not (message contents, tool definitions, calls), so
        text a user, a fetched page or a client's history writes as ``<|im_end|>`` stays plain text and cannot
        forge a turn.

        The template renders stand-ins for those strings, so its markers are found wherever the template puts them.
        """
        stand_in = _StandIns()
        marked = [stand_in.message(message) for message in messages]
        tools = next((message["tools"] for message in messages if message.get("tools")), None)
        extra = {"tools": stand_in(tools)} if tools else {}
        text = self.render(marked, add_generation_prompt, **extra)
        pieces, position = [], 0
        for match in _ANY_SENTINEL.finditer(text):
            pieces += [(text[position:match.start()], True), (stand_in.restore(match), False)]
            position = match.end()
        pieces.append((text[position:], True))
        return [(piece, trusted) for piece, trusted in pieces if piece]


def _merge_system(messages: Sequence[Message]) -> list[Message]:
    """For families without a system role: the system text opens the first user turn."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system:
        if rest and rest[0]["role"] == "user":
            rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
        else:
            rest.insert(0, {"role": "user", "content": system})
    return rest


def _gemma(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    parts = []
    for message in _merge_system(messages):
        role = "model" if message["role"] == "assistant" else "user"
        parts.append(f"<start_of_turn>{role}\n{message['content'].strip()}<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def _chatml(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    parts = [f"<|im_start|>{m['role']}\n{m['content'].strip()}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _llama3(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    parts = [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages]
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def _phi3(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    parts = [f"<|{m['role']}|>\n{m['content'].strip()}<|end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


BUILTIN_FORMATS: dict[str, ChatFormat] = {
    "gemma": ChatFormat("gemma", _gemma, ("<end_of_turn>",)),
    "chatml": ChatFormat("chatml", _chatml, ("<|im_end|>",)),
    "llama3": ChatFormat("llama3", _llama3, ("<|eot_id|>",), "llama3"),
    "phi3": ChatFormat("phi3", _phi3, ("<|end|>",)),
}

# Architectures whose chat family is unambiguous. "llama" is deliberately absent: Llama 2, Llama 3 and
# Mistral share it with three different formats.
ARCHITECTURE_FORMATS = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "qwen2": "chatml",
    "qwen2moe": "chatml",
    "qwen3": "chatml",
    "qwen3moe": "chatml",
    "phi3": "phi3",
}


def _raise(message: str) -> None:
    raise TemplateError(message)


def template_format(template: str, bos_token: str, eos_token: str, adds_bos: bool = True) -> ChatFormat:
    """A ChatFormat from a GGUF's Jinja template, rendered in a sandbox; ``adds_bos``: the tokenizer adds BOS."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.filters["tojson"] = _tojson
    try:
        compiled = env.from_string(template)
    except TemplateError as exc:
        raise ConfigError(f"The model's chat template does not compile: {exc}") from None

    def render(messages: Sequence[Message], add_generation_prompt: bool, tools: list | None = None) -> str:
        text = compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, tools=tools)
        # The tokenizer adds BOS itself when the vocabulary asks for it; never twice. (SmolLM2's BOS text is
        # <|im_start|> and its vocabulary adds none: there the template's first marker must stay.)
        return text[len(bos_token):] if adds_bos and bos_token and text.startswith(bos_token) else text

    stops = (eos_token,) if eos_token else ()
    return ChatFormat("template", render, stops, template_tool_format(template), renders_tools=True)


def choose_format(metadata: dict[str, str], override: str | None, bos_token: str, eos_token: str,
                  adds_bos: bool = True) -> ChatFormat:
    """Pick the chat format: explicit override, then the GGUF template, then the architecture."""
    if override:
        if override not in BUILTIN_FORMATS:
            raise ConfigError(f"LLM_CHAT_FORMAT={override!r}: choose one of {', '.join(BUILTIN_FORMATS)}")
        return BUILTIN_FORMATS[override]
    template = metadata.get("tokenizer.chat_template")
    if template:
        return template_format(template, bos_token, eos_token, adds_bos)
    architecture = metadata.get("general.architecture", "")
    if architecture in ARCHITECTURE_FORMATS:
        return BUILTIN_FORMATS[ARCHITECTURE_FORMATS[architecture]]
    raise ConfigError(
        f"The model (architecture {architecture!r}) has no chat template and its chat format cannot be known "
        f"from its architecture; set LLM_CHAT_FORMAT to one of {', '.join(BUILTIN_FORMATS)}."
    )
