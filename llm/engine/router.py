"""The service's engine: each request goes to the engine its model names, so one service can serve some
personalities from models in this process and others from remote upstreams.

A model with a path goes to the local ``ModelPool`` (created on first use: a service whose every personality
is remote never imports llama.cpp's scheduler); a model with upstreams goes to the ``RemoteEngine`` for that
list of upstreams (and local tokenizer), one per distinct list, so two personalities naming the same servers
share their routing, health checks and counters.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from llm.engine import Engine, GenerationRequest, Handle, Message
from llm.engine.remote import LocalTokenizer, RemoteEngine, parse_upstreams
from llm.models import ModelSpec
from llm.settings import Settings


class EngineRouter:
    """Implements ``llm.engine.Engine`` by delegating to the local pool or a remote engine."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._local: Any = None
        self._remote: dict[tuple[tuple[str, ...], str | None], RemoteEngine] = {}

    def engine_for(self, model: ModelSpec) -> Engine:
        with self._lock:
            if model.upstreams:
                key = (model.upstreams, model.tokenizer)
                if key not in self._remote:
                    tokenizer = LocalTokenizer(model.tokenizer) if model.tokenizer else None
                    self._remote[key] = RemoteEngine(parse_upstreams(model.upstreams), self.settings.upstream_timeout,
                                                     tokenizer=tokenizer)
                return self._remote[key]
            if self._local is None:
                from llm.engine.pool import ModelPool

                self._local = ModelPool(self.settings)
            return self._local

    def _engines(self) -> list[Engine]:
        with self._lock:
            return [engine for engine in (self._local, *self._remote.values()) if engine is not None]

    def preload(self, model: ModelSpec) -> None:
        """Start loading a local model, or the routing (and first health facts) of remote ones."""
        engine = self.engine_for(model)
        if not model.upstreams:
            engine.preload(model)

    def submit(self, request: GenerationRequest) -> Handle:
        return self.engine_for(request.model).submit(request)

    def count_tokens(self, model: ModelSpec, messages: Sequence[Message]) -> int:
        return self.engine_for(model).count_tokens(model, messages)

    def count_text_tokens(self, model: ModelSpec, text: str) -> int:
        return self.engine_for(model).count_text_tokens(model, text)

    def tool_format(self, model: ModelSpec) -> str:
        return self.engine_for(model).tool_format(model)

    def describe(self, model: ModelSpec) -> dict[str, Any]:
        return self.engine_for(model).describe(model)

    def forget(self, conversation: str) -> None:
        for engine in self._engines():
            engine.forget(conversation)

    def stats(self) -> dict[str, Any]:
        """The figures of every engine in one dictionary (each keeps its own keys: models, upstreams)."""
        merged: dict[str, Any] = {"loading": [], "load_errors": {}, "models": {}}
        for engine in self._engines():
            for key, value in engine.stats().items():
                if isinstance(value, dict):
                    merged.setdefault(key, {}).update(value)
                elif isinstance(value, list):
                    merged.setdefault(key, []).extend(value)
                else:
                    merged[key] = value
        return merged

    def close(self) -> None:
        for engine in self._engines():
            engine.close()
