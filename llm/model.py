"""A loaded GGUF model: weights, vocabulary, metadata and chat format, through llama.cpp's C API.

Tokenizing and formatting only read the vocabulary, so route threads may call them while the scheduler
thread decodes; only the scheduler touches the context (see ``llm.scheduler``).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence

import llama_cpp

from llm.chat_format import ChatFormat, Message, choose_format
from llm.errors import ConfigError
from llm.models import ModelSpec
from llm.settings import Settings

log = logging.getLogger(__name__)


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
        self.ptr = llama_cpp.llama_model_load_from_file(spec.path.encode(), params)
        if not self.ptr:
            raise ConfigError(f"Could not load model {spec.path} (not a GGUF file, or not enough memory)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.metadata = self._read_metadata()
        self.bos_text = self.token_text(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos_text = self.token_text(llama_cpp.llama_vocab_eos(self.vocab))
        self.chat_format: ChatFormat = choose_format(self.metadata, settings.chat_format, self.bos_text, self.eos_text)
        log.info("loaded %s (%s, chat format %s, %d GPU layers)", spec.name, self.architecture,
                 self.chat_format.name, self.gpu_layers)

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

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Text to tokens; special tokens written in the text (``<start_of_turn>``) are parsed as such."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity,
                                         add_special and self.add_bos, True)
        if count < 0:  # buffer too small: the negated count is the size needed
            capacity = -count
            tokens = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity,
                                             add_special and self.add_bos, True)
        return list(tokens[:count])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character)."""
        buf = ctypes.create_string_buffer(64)
        size = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if size < 0:
            buf = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:size]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def render(self, messages: Sequence[Message]) -> str:
        """Messages as prompt text ending with the assistant's turn opening."""
        return self.chat_format.render(messages, True)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None
