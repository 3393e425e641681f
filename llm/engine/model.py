"""A loaded GGUF model: weights, vocabulary, metadata and chat format, through llama.cpp's C API.

Tokenizing and formatting only read the vocabulary, so route threads may call them while the scheduler
thread decodes; only the scheduler touches the context (see ``llm.engine.scheduler``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
import threading
from collections.abc import Sequence

import llama_cpp

from llm.engine import GrammarConstraint
from llm.engine.chat_format import ChatFormat, Message, choose_format
from llm.engine.memory import kv_bytes_per_token
from llm.engine.tools import ToolFormat, tool_format
from llm.errors import ConfigError
from llm.models import ModelSpec
from llm.settings import Settings

log = logging.getLogger(__name__)
LLAMA_LOG = logging.getLogger("llm.llama_cpp")
# ggml_log_level of the vendored llama.cpp: NONE, DEBUG, INFO, WARN, ERROR, CONT (continues the previous message;
# llama-cpp-python's own shim still has the older numbering, which showed every info line as a warning).
_LLAMA_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


class LlamaLog:
    """llama.cpp's own log (by default ~150 loader lines on stderr per model) routed into Python logging as
    ``llm.llama_cpp``, which shows warnings and errors unless ``LLM_VERBOSE_ENGINE`` lowers its level.

    llama.cpp keeps the callback for the whole process, so exactly one exists, for the whole process
    (``install``): a callback freed with an app that closed would crash the next model load."""

    def __init__(self):
        self._last = logging.INFO
        self.loading = threading.local()  # the offload line llama.cpp printed while this thread loaded a model
        self._callback = llama_cpp.llama_log_callback(self._log)
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    @staticmethod
    @functools.cache
    def install() -> LlamaLog:
        return LlamaLog()

    @staticmethod
    def verbose(on: bool) -> None:
        LLAMA_LOG.setLevel(logging.DEBUG if on else logging.WARNING)

    def _log(self, level: int, text: bytes, _user_data) -> None:
        self._last = self._last if level == 5 else _LLAMA_LEVELS.get(level, logging.INFO)
        if b"offloaded" in text:  # "load_tensors: offloaded 31/31 layers to GPU": what really happened
            self.loading.offload = text.decode("utf-8", "replace").strip().partition(": ")[2]
        if LLAMA_LOG.isEnabledFor(self._last):
            message = text.decode("utf-8", "replace").strip()
            if message.strip("."):  # not the loader's progress dots
                LLAMA_LOG.log(self._last, message)


def gpu_layers(setting: int | None) -> int:
    """``auto`` means every layer when llama.cpp was built with GPU support, none otherwise."""
    if setting is None:
        return -1 if llama_cpp.llama_supports_gpu_offload() else 0
    return setting


class LoadedModel:
    """Weights and vocabulary of one GGUF file, shared by every personality that uses it."""

    def __init__(self, spec: ModelSpec, settings: Settings):
        self.spec = spec
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers(settings.gpu_layers)
        self.gpu_layers = params.n_gpu_layers
        loading = LlamaLog.install().loading
        loading.offload = None
        self.ptr = llama_cpp.llama_model_load_from_file(spec.path.encode(), params)
        self.offload = loading.offload  # llama.cpp's own account of the GPU offload, when it gave one
        if not self.ptr:
            raise ConfigError(f"Could not load model {spec.path} (not a GGUF file, or not enough memory)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        # Every generated token's bytes, looked up once: the scheduler asks for each token of every stream between
        # two decodes, where a ctypes call and a fresh buffer cost 10 us, a list index nothing.
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.metadata = self._read_metadata()
        self.bos_text = self.token_text(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos_text = self.token_text(llama_cpp.llama_vocab_eos(self.vocab))
        self.chat_format: ChatFormat = choose_format(self.metadata, settings.chat_format, self.bos_text, self.eos_text,
                                                     self.add_bos)
        self.tool_format: ToolFormat = tool_format(settings.tool_format or self.chat_format.tool_format)
        self._special_ids, self._specials = self._special_tokens()
        self._check_tool_format()
        self.end_tokens = tuple(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))
        self._ends = frozenset(self.end_tokens)
        self._trusted_cache: dict[str, list[tuple[str, int | None]]] = {}
        log.info("loaded %s (%s, chat format %s, tool format %s; %s)", spec.name, self.architecture,
                 self.chat_format.name, self.tool_format.name, self._placement())

    def _placement(self) -> str:
        """Where the layers went, in llama.cpp's words when it said (not only what was asked)."""
        if not llama_cpp.llama_supports_gpu_offload():
            return "CPU only: llama.cpp was built without GPU support"
        if self.offload:
            return f"{self.offload} (asked for {'all' if self.gpu_layers < 0 else self.gpu_layers})"
        return f"asked for {self.gpu_layers} GPU layers; llama.cpp reported no offload"

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token (f16 keys and values in every layer), for sizing the cache."""
        heads, kv_heads = llama_cpp.llama_model_n_head(self.ptr), llama_cpp.llama_model_n_head_kv(self.ptr)
        head = llama_cpp.llama_model_n_embd(self.ptr) // max(heads, 1)
        key = int(self.metadata.get(f"{self.architecture}.attention.key_length", head))
        value = int(self.metadata.get(f"{self.architecture}.attention.value_length", head))
        return kv_bytes_per_token(llama_cpp.llama_model_n_layer(self.ptr), kv_heads, key, value)

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "unknown")

    def _read_metadata(self) -> dict[str, str]:
        result = {}
        buf = ctypes.create_string_buffer(1 << 16)
        for index in range(llama_cpp.llama_model_meta_count(self.ptr)):
            llama_cpp.llama_model_meta_key_by_index(self.ptr, index, buf, len(buf))
            key = buf.value.decode("utf-8", "replace")
            size = llama_cpp.llama_model_meta_val_str_by_index(self.ptr, index, None, 0)
            value = ctypes.create_string_buffer(max(size, 0) + 1)
            llama_cpp.llama_model_meta_val_str_by_index(self.ptr, index, value, len(value))
            result[key] = value.value.decode("utf-8", "replace")
        return result

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.piece(token, special=True).decode("utf-8", "replace")

    def _check_tool_format(self) -> None:
        """A tool format the template writes needs a template, and its control token in the vocabulary."""
        form = self.tool_format
        if form.in_template and not self.chat_format.renders_tools:
            raise ConfigError(f"The {form.name} tool format is written by the model's own chat template; this model "
                              f"is formatted as {self.chat_format.name} (set LLM_TOOL_FORMAT to hermes or llama3).")
        if form.special and form.special not in self._special_ids:
            raise ConfigError(f"The {form.name} tool format needs the {form.special} control token, which this "
                              "model's vocabulary lacks (set LLM_TOOL_FORMAT to hermes or llama3).")

    def with_special_rule(self, constraint: GrammarConstraint) -> str:
        """A service-written grammar with its ``special`` rule defined as this model's control token."""
        if constraint.special_token is None:
            return constraint.lark
        return f"{constraint.lark}\nspecial: <[{self._special_ids[constraint.special_token]}]>"

    def _special_tokens(self) -> tuple[dict[str, int], re.Pattern | None]:
        """Texts of the vocabulary's control and user-defined markup tokens, and a pattern that finds them."""
        wanted = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        found: dict[str, int] = {}
        for token in range(self.n_vocab):
            if llama_cpp.llama_vocab_get_attr(self.vocab, token) & wanted:
                text = self.token_text(token)
                if text.strip() and (not text.isalnum()):
                    found.setdefault(text, token)
        if not found:
            return found, None
        return found, re.compile("|".join(re.escape(text) for text in sorted(found, key=len, reverse=True)))

    def _tokenize(self, text: str, add_bos: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_bos, parse_special)
        if count < 0:  # buffer too small: the negated count is the size needed
            capacity = -count
            tokens = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_bos, parse_special)
        return list(tokens[:count])

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """A raw completion prompt written by the client: special tokens written in it are parsed as such."""
        return self._tokenize(text, add_special and self.add_bos, True)

    def tokenize_plain(self, text: str) -> list[int]:
        """Untrusted text as plain text: no substring becomes a control or user-defined token."""
        if not text:
            return []
        if self._specials is None:
            return self._tokenize(text, False, False)
        tokens, position = [], 0
        for match in self._specials.finditer(text):
            marker = match.group()  # user-defined tokens match even without special parsing: split them
            tokens += self._tokenize(text[position:match.start()], False, False)
            tokens += self._tokenize(marker[:1], False, False) + self._tokenize(marker[1:], False, False)
            position = match.end()
        return tokens + self._tokenize(text[position:], False, False)

    def tokenize_messages(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """The chat prompt's tokens: the template's markers as special tokens, every message's content as text."""
        tokens = [llama_cpp.llama_vocab_bos(self.vocab)] if self.add_bos else []
        run: list[str] = []  # plain text between special tokens, tokenized together as llama.cpp would
        for text, trusted in self.chat_format.segments(messages, add_generation_prompt):
            if not trusted:
                run.append(text)
                continue
            for piece, special in self._split_trusted(text):
                if special is None:
                    run.append(piece)
                else:
                    tokens += self.tokenize_plain("".join(run)) + [special]
                    run = []
        return tokens + self.tokenize_plain("".join(run))

    def _split_trusted(self, text: str) -> list[tuple[str, int | None]]:
        """Template text as plain pieces and special tokens (cached: templates repeat the same few strings)."""
        cached = self._trusted_cache.get(text)
        if cached is None:
            cached, position = [], 0
            for match in self._specials.finditer(text) if self._specials else ():
                cached += [(text[position:match.start()], None), ("", self._special_ids[match.group()])]
                position = match.end()
            cached.append((text[position:], None))
            if len(self._trusted_cache) < 4096:
                self._trusted_cache[text] = cached
        return cached

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character)."""
        if not special:
            known = self._pieces[token]
            if known is None:
                known = self._pieces[token] = self._piece(token, False)
            return known
        return self._piece(token, True)

    def _piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        size = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if size < 0:
            buf = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:size]

    def is_eog(self, token: int) -> bool:
        return token in self._ends

    def render(self, messages: Sequence[Message]) -> str:
        """Messages as prompt text ending with the assistant's turn opening."""
        return self.chat_format.render(messages, True)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None
