"""The remote engine: the same ``Engine`` protocol, served by OpenAI-compatible upstreams (llama.cpp's
llama-server, llama-cpp-python's server, vLLM, Ollama, TGI, another instance of this service) instead of a model
in this process. Everything above the engine stays ours: personalities, RAG, conversations, users, ``/toil``'s
validation (an upstream's answer is checked here like a local one).

``LLM_UPSTREAMS`` lists them for the whole service, a personality's ``[model] upstreams`` for that personality
(``url``, ``url|key`` or ``url|$VARIABLE``; the url ends in ``/v1``). Each request
goes to the healthy upstream with the fewest requests in flight; one that cannot be reached before its first
token is marked down and the next one tried (failover), one that fails mid-answer ends that answer with a 502
naming it (its text so far was already streamed: it is never silently spliced with another's). A background
check (``GET /models``) brings upstreams back. Stop and disconnect close the upstream stream at once, so the
upstream stops generating. Token counts use the upstream's tokenizer when it has one (llama-cpp-python's
``/extras/tokenize``, llama-server's and vLLM's ``/tokenize``), else a local copy of it when one is configured
(``LocalTokenizer``), else a deliberate over-estimate of one token per three characters plus eight per message,
so budgets and history trimming never overflow the upstream's window.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from llm.engine import GenerationRequest, GrammarConstraint, Handle, JsonConstraint, Message, Usage
from llm.errors import ConfigError, GenerationFailed, Overloaded, ServiceError, TimedOut, Unprocessable

log = logging.getLogger(__name__)
HEALTH_INTERVAL = 5.0  # seconds between checks of an upstream that is down
CHARS_PER_TOKEN = 3  # the estimate without a tokenizer: fewer characters per token than real text has
COUNTS_KEPT = 4096


class BadGateway(ServiceError):
    """An upstream answered badly, or stopped answering mid-stream."""

    status = 502
    type = "bad_gateway"


@dataclass
class Upstream:
    """One OpenAI-compatible server, with what routing needs to know of it."""

    url: str  # ends in /v1
    key: str = ""
    healthy: bool = True
    in_flight: int = 0
    answered: int = 0
    failures: int = 0
    last_error: str = ""
    model: str = ""  # the id the upstream serves (its first /models entry), found on first use
    tokenizer: str | None = None  # "extras" | "server" | "" (none), found on first use
    structured: str | None = None  # how it takes a JSON Schema: "json_schema" (OpenAI's), "json_object" (with a
    # "schema", llama-cpp-python's) or "" (not at all: the answer is only validated here); found on first use

    @property
    def name(self) -> str:
        return self.url.removesuffix("/v1").removeprefix("http://").removeprefix("https://")

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


def split_upstreams(spec: str) -> tuple[str, ...]:
    """``LLM_UPSTREAMS``'s comma-separated items."""
    return tuple(filter(None, (part.strip() for part in spec.split(","))))


def parse_upstreams(items: str | Iterable[str], where: str = "LLM_UPSTREAMS") -> list[Upstream]:
    """Each item ``url``, ``url|key`` or ``url|$VARIABLE`` (the key read from that environment variable, so that
    personality files need not hold secrets); each url an http(s) OpenAI base ending in /v1. A string is
    ``LLM_UPSTREAMS``'s comma-separated list."""
    upstreams = []
    for item in split_upstreams(items) if isinstance(items, str) else items:
        url, _, key = item.partition("|")
        url, key = url.strip().rstrip("/"), key.strip()
        if not url.startswith(("http://", "https://")) or not url.endswith("/v1"):
            raise ConfigError(f"{where}: {url!r} must be an http(s) URL ending in /v1.")
        if key.startswith("$"):
            if not os.environ.get(key[1:]):
                raise ConfigError(f"{where}: the key of {url} is read from ${key[1:]}, which is not set.")
            key = os.environ[key[1:]]
        upstreams.append(Upstream(url, key))
    if not upstreams:
        raise ConfigError(f"{where} names no upstream.")
    return upstreams


class LocalTokenizer:
    """The upstreams' tokenizer read here, for upstreams without a tokenize endpoint (Ollama, OpenAI's API): a GGUF
    of their model through llama.cpp (vocabulary only: no weights are loaded) or a Hugging Face ``tokenizer.json``
    (the ``tokenizers`` library, which vLLM and TGI models ship for)."""

    def __init__(self, path: str):
        self._llama = self._tokenizer = None
        if not Path(path).is_file() or not path.endswith((".gguf", ".json")):
            raise ConfigError(f"The upstream tokenizer {path} must be an existing .gguf or tokenizer .json file.")
        try:
            if path.endswith(".gguf"):
                import llama_cpp

                self._llama = llama_cpp.Llama(path, vocab_only=True, verbose=False)
            else:
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_file(path)
        except Exception as error:  # noqa: BLE001 - llama.cpp and tokenizers raise their own kinds
            raise ConfigError(f"The upstream tokenizer {path} cannot be read: {error}") from None

    def count(self, text: str) -> int:
        if self._llama is not None:
            return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def close(self) -> None:
        if self._llama is not None:
            self._llama.close()


class RemoteEngine:
    """Implements ``llm.engine.Engine`` over HTTP (see the module's docstring)."""

    def __init__(self, upstreams: list[Upstream], timeout: float = 60.0,
                 session_factory: Callable[[], requests.Session] = requests.Session,
                 tokenizer: LocalTokenizer | None = None):
        self.upstreams, self.timeout, self.tokenizer = upstreams, timeout, tokenizer
        self._session = session_factory()
        self._lock = threading.Lock()
        self._counts: OrderedDict[str, int] = OrderedDict()  # text -> tokens, least recently used first
        self._closed = threading.Event()
        threading.Thread(target=self._check_health, name="upstream-health", daemon=True).start()

    # ----- routing ---------------------------------------------------------------------------------------

    def _choose(self, tried: set[str]) -> Upstream:
        with self._lock:
            candidates = [u for u in self.upstreams if u.healthy and u.url not in tried]
            if not candidates:
                down = "; ".join(f"{u.name}: {u.last_error or 'down'}" for u in self.upstreams)
                raise Overloaded(f"No upstream can answer now ({down}); please retry shortly.", retry_after=5)
            chosen = min(candidates, key=lambda u: u.in_flight)
            chosen.in_flight += 1
            return chosen

    def _release(self, upstream: Upstream, error: str = "") -> None:
        with self._lock:
            upstream.in_flight -= 1
            if error:
                upstream.failures += 1
                upstream.healthy, upstream.last_error = False, error
                log.warning("upstream %s is down: %s", upstream.name, error)
            else:
                upstream.answered += 1

    def _check_health(self) -> None:
        """Bring upstreams that were marked down back once they answer /models again."""
        while not self._closed.wait(HEALTH_INTERVAL):
            for upstream in [u for u in self.upstreams if not u.healthy]:
                try:
                    self._model_of(upstream, refresh=True)
                except (requests.RequestException, ValueError, KeyError, IndexError):
                    continue
                with self._lock:
                    upstream.healthy, upstream.last_error = True, ""
                log.info("upstream %s is back", upstream.name)

    def _model_of(self, upstream: Upstream, refresh: bool = False) -> str:
        if refresh or not upstream.model:
            response = self._session.get(f"{upstream.url}/models", headers=upstream.headers(), timeout=5)
            response.raise_for_status()
            upstream.model = response.json()["data"][0]["id"]
        return upstream.model

    # ----- the Engine interface --------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Handle:
        if isinstance(request.constraint, GrammarConstraint):
            raise Unprocessable("Tool calling is served by the local engine only (its grammar cannot be sent "
                                "upstream); ask without tools.")
        handle = Handle(timeout=request.timeout or 300.0)
        threading.Thread(target=self._run, args=(handle, request), name="upstream-answer", daemon=True).start()
        return handle

    def _body(self, upstream: Upstream, request: GenerationRequest, structured: str) -> dict[str, Any]:
        sampling = request.sampling
        text = ({"prompt": request.raw_prompt} if request.raw_prompt is not None
                else {"messages": [dict(m) for m in request.messages]})
        body: dict[str, Any] = {
            "model": self._model_of(upstream), **text, "stream": True,
            "max_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "stream_options": {"include_usage": True}}
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if isinstance(request.constraint, JsonConstraint) and structured:  # validated here again by the caller
            schema = request.constraint.schema if isinstance(request.constraint.schema, dict) else {}
            body["response_format"] = ({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
                                       if structured == "json_schema" else {"type": "json_object", "schema": schema})
        return body

    def _run(self, handle: Handle, request: GenerationRequest) -> None:
        """Stream from an upstream; a bug here still ends the answer (with a 500), never leaves it waiting."""
        try:
            self._answer(handle, request)
        except Exception:
            log.exception("remote answer failed")
            handle.fail(GenerationFailed("The answer failed inside the service; see its log."))

    def _answer(self, handle: Handle, request: GenerationRequest) -> None:
        """Before the first piece a failing upstream hands over to the next one."""
        tried: set[str] = set()
        while True:
            try:
                upstream = self._choose(tried)
            except ServiceError as error:
                handle.fail(error)
                return
            tried.add(upstream.url)
            try:
                self._model_of(upstream)
                self._stream(handle, upstream, request)
            except (requests.RequestException, ValueError, KeyError, IndexError) as error:  # /models failed
                self._release(upstream, type(error).__name__)
                continue
            except _Unreachable as error:  # nothing was sent yet: try the next upstream
                self._release(upstream, str(error))
                continue
            except ServiceError as error:
                self._release(upstream, "" if error.status < 500 else error.message)
                handle.fail(error)
                return
            self._release(upstream)
            return

    def _stream(self, handle: Handle, upstream: Upstream, request: GenerationRequest) -> None:
        """One upstream's answer. A JSON Schema goes in the first structured-output form it accepts (OpenAI's,
        then llama-cpp-python's, then none), remembered for the next requests."""
        started = time.monotonic()
        wants_schema = isinstance(request.constraint, JsonConstraint)
        forms = [upstream.structured] if upstream.structured is not None else ["json_schema", "json_object", ""]
        for form in forms if wants_schema else [""]:
            response = self._post(upstream, self._body(upstream, request, form))
            with response:
                refused = response.status_code >= 400 and "response_format" in response.text
                if refused and form != forms[-1]:
                    continue  # try the next form
                if response.status_code >= 400:
                    raise _upstream_error(upstream, response)
                if wants_schema:
                    upstream.structured = form
                self._relay(handle, upstream, response, started)
                return

    def _post(self, upstream: Upstream, body: dict[str, Any]):
        try:
            endpoint = "completions" if "prompt" in body else "chat/completions"
            return self._session.post(f"{upstream.url}/{endpoint}", json=body, headers=upstream.headers(),
                                      stream=True, timeout=(5, self.timeout))
        except requests.Timeout:
            raise _Unreachable(f"no answer within {self.timeout:g} s") from None
        except requests.RequestException as error:
            raise _Unreachable(type(error).__name__) from None

    def _relay(self, handle: Handle, upstream: Upstream, response, started: float) -> None:
        done = threading.Event()
        threading.Thread(target=_close_on_cancel, args=(handle, response, done), daemon=True).start()
        usage, reason, first, produced = Usage(), None, None, 0
        try:
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    usage.completion_tokens = chunk["usage"].get("completion_tokens", 0)
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    if text:
                        first = first or time.monotonic()
                        produced += 1
                        handle.push(text)
                    reason = choice.get("finish_reason") or reason
        except Exception as error:  # noqa: BLE001 - whatever a closed or broken stream raises (urllib3's own too)
            if not handle.cancelled:
                raise BadGateway(f"The upstream {upstream.name} stopped answering mid-stream "
                                 f"({type(error).__name__}).") from None
        finally:
            done.set()
        if handle.cancelled:
            reason = "cancelled"
        elif reason is None:
            raise BadGateway(f"The upstream {upstream.name} ended the stream without finishing the answer.")
        usage.completion_tokens = usage.completion_tokens or produced
        if first is not None:
            usage.time_to_first_token = first - started
            usage.tokens_per_second = usage.completion_tokens / max(time.monotonic() - first, 1e-3)
        handle.finish({"stop": "stop", "length": "length"}.get(reason, reason), usage)

    def count_tokens(self, model: Any, messages: Sequence[Message]) -> int:
        return sum(self.count_text_tokens(model, message["content"]) + 8 for message in messages)

    def count_text_tokens(self, model: Any, text: str) -> int:
        """The upstream's count (remembered: history trimming counts the same turns again and again), else the
        local tokenizer's, else the over-estimate."""
        with self._lock:
            if text in self._counts:
                self._counts.move_to_end(text)
                return self._counts[text]
        upstream = next((u for u in self.upstreams if u.healthy), None)
        counted = self._tokenize(upstream, text) if upstream is not None and text else None
        if counted is None and self.tokenizer is not None:
            counted = self.tokenizer.count(text)
        if counted is None:
            return len(text) // CHARS_PER_TOKEN + 1
        with self._lock:
            self._counts[text] = counted
            while len(self._counts) > COUNTS_KEPT:
                self._counts.popitem(last=False)
        return counted

    def _tokenize(self, upstream: Upstream, text: str) -> int | None:
        """The upstream's own count, where it offers one (found once per upstream)."""
        endpoints = {"extras": (f"{upstream.root}/extras/tokenize", {"input": text}),
                     "server": (f"{upstream.root}/tokenize", {"content": text})}
        kinds = [upstream.tokenizer] if upstream.tokenizer else ["extras", "server"]
        for kind in filter(None, kinds):
            url, body = endpoints[kind]
            try:
                response = self._session.post(url, json=body, headers=upstream.headers(), timeout=5)
                if response.ok:
                    upstream.tokenizer = kind
                    return len(response.json()["tokens"])
            except (requests.RequestException, ValueError, KeyError):
                pass
        upstream.tokenizer = upstream.tokenizer or ""
        return None

    def tool_format(self, model: Any) -> str:
        return "hermes"

    def forget(self, conversation: str) -> None:
        """The upstream keeps (or not) its own cache; nothing is held here."""

    def describe(self, model: Any) -> dict[str, Any]:
        healthy = [u for u in self.upstreams if u.healthy]
        return {"name": healthy[0].model or model.name if healthy else model.name, "path": None,
                "context_window": model.context_window, "loaded": bool(healthy),
                "upstreams": [u.name for u in self.upstreams]}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            upstreams = {u.name: {"healthy": u.healthy, "in_flight": u.in_flight, "answered": u.answered,
                                  "failures": u.failures, "last_error": u.last_error} for u in self.upstreams}
        errors = {} if any(u["healthy"] for u in upstreams.values()) else {
            name: u["last_error"] for name, u in upstreams.items()}
        return {"loading": [], "load_errors": errors, "models": {}, "upstreams": upstreams}

    def close(self) -> None:
        self._closed.set()
        self._session.close()
        if self.tokenizer is not None:
            self.tokenizer.close()


class _Unreachable(Exception):
    """The upstream could not be reached or did not start answering: another may."""


def _upstream_error(upstream: Upstream, response) -> ServiceError:
    """An upstream's 4xx is the client's error (passed on); a 5xx is the upstream's (502, or 503 when busy)."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    if response.status_code in (429, 503):
        raise _Unreachable(f"busy ({response.status_code})")
    if response.status_code == 504:
        return TimedOut(f"The upstream {upstream.name} timed out: {message}")
    if response.status_code < 500:
        return Unprocessable(f"The upstream {upstream.name} refused the request: {message}")
    return BadGateway(f"The upstream {upstream.name} failed ({response.status_code}): {message}")


def _close_on_cancel(handle: Handle, response, done: threading.Event) -> None:
    """Stop and disconnect close the upstream stream at once (the upstream then stops generating)."""
    while not done.wait(0.05):
        if handle.cancelled:
            response.close()
            return
