"""A scripted engine for fast tests: replays pieces, records what it was asked, never loads a model.

Tests script the answer (``engine.script(["Hello", " world"])``), a per-piece delay to exercise streaming and
cancellation, or an error to raise at submit; ``engine.requests`` keeps every request for assertions.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from llm.engine import GenerationRequest, Handle, JsonConstraint, Message, TokenLogprob, Usage
from llm.errors import PayloadTooLarge, ServiceError


class FakeEngine:
    """Implements ``llm.engine.Engine`` without a model: one token per word."""

    def __init__(self, pieces: Sequence[str] = ("Hello", " from", " the", " fake", " engine."), delay: float = 0.0,
                 tool_format: str = "hermes"):
        self.default_pieces = list(pieces)
        self.delay = delay
        self.tools = tool_format
        self.requests: list[GenerationRequest] = []
        self.forgotten: list[str] = []
        self._scripts: deque[list[str] | ServiceError] = deque()
        self._lock = threading.Lock()
        self.cancelled = threading.Event()

    def script(self, answer: Sequence[str] | str | ServiceError) -> None:
        """Queue what the next request answers (pieces, a whole string, or an error raised at submit)."""
        self._scripts.append(answer if isinstance(answer, (ServiceError, list)) else
                             [answer] if isinstance(answer, str) else list(answer))

    def submit(self, request: GenerationRequest) -> Handle:
        with self._lock:
            self.requests.append(request)
            answer = self._scripts.popleft() if self._scripts else list(self.default_pieces)
        if isinstance(answer, ServiceError):
            raise answer
        prompt_tokens = self.count_tokens(request.model, request.messages)
        if prompt_tokens >= request.model.context_window:
            raise PayloadTooLarge(f"The prompt takes {prompt_tokens} tokens but the context window is "
                                  f"{request.model.context_window} tokens.")
        if isinstance(request.constraint, JsonConstraint) and answer == self.default_pieces:
            answer = [json.dumps({"answer": "".join(self.default_pieces)})]
        handle = Handle(timeout=request.timeout or 30)
        threading.Thread(target=self._play, args=(handle, answer, request, prompt_tokens), daemon=True).start()
        return handle

    def _play(self, handle: Handle, pieces: list[str], request: GenerationRequest, prompt_tokens: int) -> None:
        started = time.monotonic()
        limit = request.sampling.max_tokens
        for count, piece in enumerate(pieces[:limit]):
            if handle.cancelled:
                self.cancelled.set()
                handle.finish("cancelled", Usage(prompt_tokens=prompt_tokens, completion_tokens=count))
                return
            if self.delay:
                time.sleep(self.delay)
            if request.sampling.logprobs is not None:  # every scripted piece is one certain token
                handle.logprobs.append(TokenLogprob(piece.encode(), 0.0, ((piece.encode(), 0.0),)[
                    :request.sampling.logprobs]))
            handle.push(piece)
        produced = min(len(pieces), limit)
        reason = "length" if len(pieces) > limit else "stop"
        handle.finish(reason, Usage(prompt_tokens=prompt_tokens, completion_tokens=produced,
                                    time_to_first_token=0.001, tokens_per_second=produced / max(
                                        time.monotonic() - started, 1e-3)))

    def count_tokens(self, model: Any, messages: Sequence[Message]) -> int:
        return sum(self.count_text_tokens(model, message["content"]) + 4 for message in messages)

    def count_text_tokens(self, model: Any, text: str) -> int:
        return len(text.split())

    def tool_format(self, model: Any) -> str:
        return self.tools

    def forget(self, conversation: str) -> None:
        self.forgotten.append(conversation)

    def describe(self, model: Any) -> dict[str, Any]:
        return {"name": model.name, "path": model.path, "context_window": model.context_window, "loaded": True}

    def stats(self) -> dict[str, Any]:
        return {"loading": [], "load_errors": {}, "models": {}}

    def close(self) -> None:
        pass
