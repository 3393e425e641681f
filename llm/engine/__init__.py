"""The engine: everything between a chat request and the model's tokens; here, its narrow interface: submit a
request, iterate its text pieces, cancel.

The package: ``pool`` (the real engine: loaded models, one ``scheduler`` each, continuous batching, the cache,
``drafts`` for speculative decoding, ``memory`` for KV sizing), ``model`` (a GGUF through llama.cpp, its
``chat_format`` and ``tools`` format), ``sampling`` and ``constraints`` (grammars from JSON Schemas and Lark),
``embeddings`` (the model behind /v1/embeddings), ``remote`` (the same interface served by OpenAI-compatible
upstreams), ``router`` (the service's engine: each request to the local pool or the remote engine its model
names) and ``fake`` (a scripted engine for tests).

Routes never touch llama.cpp. They build a ``GenerationRequest`` and get a ``Handle``: an iterator of text
pieces fed by the scheduler thread through a queue, with ``cancel()`` for stop buttons and disconnects and
the usage figures once it is done. The real engines (``pool.ModelPool``, ``remote.RemoteEngine`` and
``router.EngineRouter`` over both) and the test double (``fake.FakeEngine``) all implement ``Engine``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

from llm.errors import ServiceError, TimedOut

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (llama.cpp's sampler chain, plus stop strings and the token limit)."""

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    max_tokens: int = 512
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    ignore_eos: bool = False  # keep generating past end-of-generation tokens, up to max_tokens
    logprobs: int | None = None  # None: off; k: each token's log-probability and the k most likely alternatives
    speculative: bool = True  # prompt-lookup drafts (LLM_DRAFT_TOKENS); a personality may turn them off

    @classmethod
    def from_mapping(cls, values: dict[str, Any], base: SamplingParams | None = None) -> SamplingParams:
        """Known keys of ``values`` over ``base`` (unknown keys ignored: callers validate their input)."""
        names = {f.name for f in fields(cls)}
        changes = {key: value for key, value in values.items() if key in names and value is not None}
        if "stop" in changes:
            stop = changes["stop"]
            changes["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        if "logit_bias" in changes and isinstance(changes["logit_bias"], dict):
            changes["logit_bias"] = tuple((int(token), float(bias)) for token, bias in changes["logit_bias"].items())
        return replace(base or cls(), **changes)


@dataclass(frozen=True)
class JsonConstraint:
    """Ask for JSON output: ``schema`` None means any JSON object."""

    schema: dict | bool | None = None


@dataclass(frozen=True)
class GrammarConstraint:
    """Ask for output in a Lark grammar (llguidance's dialect, ``%json{...}`` for embedded schemas): the
    grammar is built by the service (tool calls), never taken from a client. ``special_token``: the text of a
    control token it writes as the rule ``special``, which the engine defines by the model's token id (the service
    cannot know ids, and llguidance names ``[TOOL_CALLS]``-style tokens only by id)."""

    lark: str
    special_token: str | None = None


@dataclass
class GenerationRequest:
    """Everything the engine needs for one answer."""

    model: Any  # llm.models.ModelSpec
    messages: Sequence[Message] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    constraint: JsonConstraint | GrammarConstraint | None = None
    conversation: str | None = None  # cache key: follow-up turns reuse this conversation's cached tokens
    raw_prompt: str | None = None  # plain completion instead of chat messages
    # Whose text this is: cached tokens are shared across owners only up to the rendering of ``public_prefix``
    # (the personality's own system prompt), so no user's prompt can be probed through another's cache.
    owner: str | None = None
    public_prefix: Sequence[Message] = ()
    timeout: float | None = None  # seconds the answer may take (LLM_REQUEST_TIMEOUT when None)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (before temperature and the sampler chain; after a
    grammar's mask), and the ``top`` most likely tokens at that position as (bytes, logprob)."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass
class Usage:
    """Figures reported when an answer ends."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    time_to_first_token: float | None = None
    tokens_per_second: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "time_to_first_token": None if self.time_to_first_token is None else round(self.time_to_first_token, 4),
            "tokens_per_second": None if self.tokens_per_second is None else round(self.tokens_per_second, 2),
        }


_DONE = object()


class Handle:
    """One submitted request: iterate it for text pieces; ``finish_reason`` and ``usage`` are set at the end.

    The producer (scheduler thread) calls ``push``/``finish``/``fail``; the consumer iterates and may
    ``cancel``. Iteration raises the ServiceError the request failed with, if any.
    """

    def __init__(self, timeout: float = 300.0):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._listener: Callable[[], None] | None = None
        self._ended = False  # take() has seen the end
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled"
        self.usage = Usage()
        self.error: ServiceError | None = None
        self.created = time.monotonic()
        self.deadline = self.created + timeout  # no piece or end by then: the consumer cancels (TimedOut)
        self.logprobs: list[TokenLogprob] = []  # appended by the producer before the token's text is pushed
        self.stop_sequence: str | None = None  # the stop string that ended the answer, when one did

    # producer side
    def push(self, text: str) -> None:
        if text:
            self._queue.put(text)
            self._tell()

    def finish(self, reason: str, usage: Usage) -> None:
        self.finish_reason, self.usage = reason, usage
        self._queue.put(_DONE)
        self._tell()

    def fail(self, error: ServiceError) -> None:
        self.error = error
        self._queue.put(_DONE)
        self._tell()

    def _tell(self) -> None:
        listener = self._listener
        if listener is not None:
            listener()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # consumer side
    def cancel(self) -> None:
        """Stop at the next scheduler step; the iterator then ends with finish_reason 'cancelled'."""
        self._cancelled.set()

    def listen(self, listener: Callable[[], None]) -> None:
        """Have ``listener`` called whenever a piece or the end arrives, to read them with ``take`` instead of
        iterating: a consumer on an event loop then needs no thread of its own. It is called on the producer's
        thread (the scheduler's), so it must be quick and never block; and once right away, for what came before."""
        self._listener = listener
        listener()

    def take(self) -> tuple[list[str], bool]:
        """The pieces that have arrived, without waiting, and whether the answer has ended (then ``error`` says
        whether it failed)."""
        pieces: list[str] = []
        while not self._ended:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _DONE:
                self._ended = True
            else:
                pieces.append(item)
        return pieces, self._ended

    def timed_out(self) -> TimedOut:
        """Cancel at the deadline; the error to raise."""
        self.cancel()
        return TimedOut("The answer took too long and was cancelled; the service may be busy.")

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, self.deadline - time.monotonic()))
            except queue.Empty:
                raise self.timed_out() from None
            if item is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def text(self) -> str:
        """Wait for the whole answer."""
        return "".join(self)


class Engine(Protocol):
    """What routes may ask of an engine."""

    def submit(self, request: GenerationRequest) -> Handle:
        """Queue a request; raises Overloaded, PayloadTooLarge, BadRequest or Unprocessable synchronously."""

    def count_tokens(self, model: Any, messages: Sequence[Message]) -> int:
        """Tokens the formatted messages take (with the generation prompt)."""

    def count_text_tokens(self, model: Any, text: str) -> int:
        """Tokens a piece of plain text takes."""

    def tool_format(self, model: Any) -> str:
        """How this model reads tools and writes calls (a name in ``llm.engine.tools.TOOL_FORMATS``)."""

    def forget(self, conversation: str) -> None:
        """Drop a conversation's cached state."""

    def describe(self, model: Any) -> dict[str, Any]:
        """Facts about a model for clients (name, context window, loaded or not)."""

    def stats(self) -> dict[str, Any]:
        """Queue depth, active sequences, cache figures."""

    def close(self) -> None:
        """Stop scheduler threads and free models."""
