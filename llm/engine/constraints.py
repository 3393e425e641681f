"""Schema-constrained decoding: JSON Schema -> llguidance grammar -> a token mask applied to llama's logits.

Chosen over llama.cpp's JSON-Schema-to-GBNF converter by measurement (``bench/schema_coverage.py``): llguidance
enforces more of JSON Schema, reports what it cannot enforce instead of silently loosening the grammar, and
keeps untrusted grammars away from llama.cpp's C++ grammar parser. One ``ConstraintCompiler`` exists per loaded
model; compiled grammars are cached and shared; each request gets its own ``ConstraintState``.
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import llguidance
import numpy as np

from llm.errors import BadRequest, GenerationFailed, ServiceError, Unprocessable
from llm.schema_support import (
    check_limits,
    check_schema,
    normalise,
    overlapping_one_of,
    validate_output,
    without_keywords,
    without_ref_siblings,
)

# Compact JSON: no whitespace anywhere, so the model cannot pad a document forever.
_JSON_OPTIONS = {"whitespace_flexible": False, "coerce_one_of": False, "lenient": False}
_ONE_OF_COERCED = "oneOf not fully supported, falling back to anyOf"
# Strict-mode refusals a superset grammar can stand in for: the answer is then checked against the exact schema
# (and resampled when it fails), so the schema is served instead of refused.
_SUPERSET_ABLE = ("Unimplemented keys:", "Unknown format:", "oneOf constraints are not supported")
_RECURSIVE_SIBLINGS = "circular references with sibling keys are not supported"
_PROPERTY_COUNTS = "min/maxProperties only supported when all keys listed"
_ANY_OBJECT: dict = {"type": "object"}
_FEW_WORDS = 256  # below this many mask words to expand, per-bit indexing beats a full pass
_BIT = np.arange(32, dtype=np.int32)
_BIT.flags.writeable = False
# Row b holds the additive bias (0 or -inf) for the 8 tokens whose mask bits are the byte b (little-endian bits).
_BYTE_TO_BIAS = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little"),
                         np.float32(0), np.float32(-np.inf)).astype(np.float32)
_BYTE_TO_BIAS.flags.writeable = False


def apply_bitmask(logits: np.ndarray, mask: np.ndarray, vocab_size: int, scratch: np.ndarray | None = None) -> None:
    """Set logits of tokens whose mask bit is 0 to -inf, in place; tokens past ``vocab_size`` are forbidden.

    Three paths, so that no mask shape costs more than one branch-free pass (~100 µs for 262k tokens): few
    allowed words (structure), few forbidden words (free text), or a mixed mask (length-limited strings).
    """
    n = min(len(logits), vocab_size)
    if len(logits) > n:
        logits[n:] = -np.inf
    live = np.flatnonzero(mask)
    if live.size <= _FEW_WORDS:
        keep = _set_bits(live, mask[live], n)
        saved = logits[keep]
        logits[:n] = -np.inf
        logits[keep] = saved
        return
    partial = np.flatnonzero(mask != -1)
    if partial.size <= _FEW_WORDS:
        logits[_set_bits(partial, ~mask[partial], n)] = -np.inf
        return
    scratch = np.empty((mask.size * 4, 8), dtype=np.float32) if scratch is None else scratch
    np.take(_BYTE_TO_BIAS, mask.view(np.uint8), axis=0, out=scratch)
    np.add(logits[:n], scratch.reshape(-1)[:n], out=logits[:n])


def _set_bits(rows: np.ndarray, words: np.ndarray, limit: int) -> np.ndarray:
    """Token ids of the set bits in ``words`` (bit i of word r is token 32*r+i), below ``limit``."""
    bits = ((words[:, None] >> _BIT) & 1).astype(bool)
    ids = (rows[:, None] * 32 + _BIT)[bits]
    return ids[ids < limit]


class ConstraintState:
    """The grammar's position in one answer; used only by the scheduler thread."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._mask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._scratch = np.empty((self._mask.size * 4, 8), dtype=np.float32)

    def mask_logits(self, logits: np.ndarray) -> None:
        """Forbid, in place, every token the grammar does not allow next (EOS only once the value is complete)."""
        self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        if self._matcher.is_error():
            raise GenerationFailed(f"The JSON constraint failed: {self._matcher.get_error()}")
        apply_bitmask(logits, self._mask, self._vocab_size, self._scratch)

    def accept(self, token: int) -> None:
        """Advance past a sampled token; a token the mask forbade means a scheduler bug, so fail loudly."""
        if not self._matcher.consume_token(int(token)):
            raise GenerationFailed(f"Token {token} is not allowed by the JSON schema: {self._matcher.get_error()}")

    def is_finished(self) -> bool:
        """The value is complete and nothing may follow: the engine stops without waiting for EOS."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def is_accepting(self) -> bool:
        """The text so far is a complete value (stopping here yields valid JSON)."""
        return self._matcher.is_accepting()


class Grammar:
    """A compiled schema; immutable and shared by every request that uses the same schema.

    ``loosened`` names what the grammar enforces only as a superset (a keyword, a format, an overlapping oneOf);
    empty when every valid-by-grammar answer validates."""

    def __init__(self, schema: dict | bool | None, template: llguidance.LLMatcher, vocab_size: int,
                 loosened: tuple[str, ...] = ()):
        self._schema = schema
        self._template = template
        self._vocab_size = vocab_size
        self.loosened = loosened
        self._lock = threading.Lock()

    @property
    def schema(self) -> dict | bool | None:
        """The schema answers are validated against (None: any JSON object)."""
        return self._schema

    def new_state(self) -> ConstraintState:
        """A fresh matcher for one answer, copied from the pristine template (cheaper than rebuilding)."""
        with self._lock:
            matcher = self._template.deep_copy()
        return ConstraintState(matcher, self._vocab_size)


class ConstraintCompiler:
    """Compiles schemas for one model's vocabulary, with limits, a time limit and an LRU cache."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, n_vocab: int, *, max_schema_bytes: int = 64_000,
                 max_depth: int = 32, compile_timeout_s: float = 5.0, cache_size: int = 256, owner: Any = None):
        self.tokenizer = tokenizer
        self.n_vocab = n_vocab
        self.max_schema_bytes = max_schema_bytes
        self.max_depth = max_depth
        self.compile_timeout_s = compile_timeout_s
        self.cache_size = cache_size
        self._owner = owner  # keeps the llama model (whose vocab the tokenizer points into) alive
        self._vocab_size = max(n_vocab, tokenizer.vocab_size)
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="schema-compile")

    @classmethod
    def for_llama_model(cls, source: Any, n_vocab: int | None = None, **options: Any) -> ConstraintCompiler:
        """Build from a llama.cpp vocab pointer, or anything with one (a ``Llama``, a model with ``.vocab``); ~1.5 s.

        The tokenizer reads the vocabulary through that pointer, so the compiler must not outlive the model.
        """
        import llama_cpp

        vocab = _vocab_pointer(source)
        n_tokens = llama_cpp.llama_vocab_n_tokens(vocab)
        tokenizer = _llama_tokenizer(llama_cpp, vocab, max(n_vocab or n_tokens, n_tokens))
        return cls(tokenizer, n_vocab or n_tokens, owner=source, **options)

    def compile_json(self, schema: dict | bool | None) -> Grammar:
        """The grammar for a schema (None: any JSON object); 400 for a bad schema, 422 for an unenforceable one."""
        target = _ANY_OBJECT if schema is None else schema
        key = check_limits(target, max_bytes=self.max_schema_bytes, max_depth=self.max_depth)
        key = "null" if schema is None else key
        return self._wait(key, self._cached_future(key, self._compile, schema))

    def compile_lark(self, lark: str) -> Grammar:
        """A grammar the service wrote (tool calls embed the clients' schemas, already checked by the caller);
        answers are validated by that caller, so the grammar's schema is None."""
        key = "lark:" + lark
        return self._wait(key, self._cached_future(key, self._compile_lark, lark))

    def _wait(self, key: str, future: Future) -> Grammar:
        try:
            return future.result(timeout=self.compile_timeout_s)
        except FutureTimeout:
            error = Unprocessable(f"The schema took longer than {self.compile_timeout_s:g} s to compile; "
                                  "simplify it.", param="schema")
            self._store_failure(key, future, error)
            raise error from None
        except ServiceError as error:
            raise type(error)(error.message, param=error.param) from None

    def cache_info(self) -> dict[str, int]:
        """Entries in the schema cache, for metrics and tests."""
        with self._lock:
            return {"size": len(self._cache), "max_size": self.cache_size}

    def close(self) -> None:
        """Stop the compile workers (when the model is unloaded)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _cached_future(self, key: str, compile_one, source: Any) -> Future:
        """The cached (possibly still running) compile for this key; concurrent requests share one compile."""
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile_safely, compile_one, source)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def _store_failure(self, key: str, future: Future, error: ServiceError) -> None:
        """Remember a timed-out compile as failed, so repeating the schema fails fast."""
        failed: Future = Future()
        failed.set_exception(error)
        with self._lock:
            if self._cache.get(key) is future:
                self._cache[key] = failed

    @staticmethod
    def _compile_safely(compile_one, source: Any) -> Grammar:
        """Compile, turning any unexpected failure into a 422 so no schema can cause a 500."""
        try:
            return compile_one(source)
        except ServiceError:
            raise
        except RecursionError:
            raise BadRequest("The schema is nested too deeply to process.", param="schema") from None
        except Exception as exc:  # noqa: BLE001 - a hostile schema must never surface as a server error
            raise Unprocessable(f"The schema could not be compiled: {exc}", param="schema") from None

    def _compile(self, schema: dict | bool | None) -> Grammar:
        """Validate, screen and compile one schema (runs on a compile worker)."""
        if schema is not None:
            check_schema(schema, max_bytes=self.max_schema_bytes, max_depth=self.max_depth)
        if schema is False:
            raise Unprocessable("The schema `false` allows no value at all.", param="schema")
        target = _ANY_OBJECT if schema is None else {} if schema is True else normalise(schema)
        matcher, loosened = self._build_matcher(target)
        self._probe(matcher)
        return Grammar(schema, matcher, self._vocab_size, loosened)

    def _compile_lark(self, lark: str) -> Grammar:
        """Compile a service-written Lark grammar; its embedded schemas may still be unenforceable (a 422)."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        except ValueError as exc:
            raise Unprocessable(f"The constraint engine could not read the grammar: {exc}", param="tools") from None
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise classify_error(matcher.get_error().split("failed to compile JSON schema: ")[-1])
        self._probe(matcher)
        return Grammar(None, matcher, self._vocab_size)

    def _build_matcher(self, schema: dict) -> tuple[llguidance.LLMatcher, tuple[str, ...]]:
        """The exact grammar when llguidance can enforce the whole schema; otherwise a superset (lenient mode;
        recursive references without their sibling keywords), with what it loosened. A oneOf proven exclusive is
        exact even as anyOf."""
        loosened: tuple[str, ...] = ()
        matcher = self._matcher(schema, lenient=False)
        if _RECURSIVE_SIBLINGS in matcher.get_error():
            schema, loosened = without_ref_siblings(schema), ("keywords beside a recursive $ref",)
            matcher = self._matcher(schema, lenient=False)
        if _PROPERTY_COUNTS in matcher.get_error():
            schema = without_keywords(schema, frozenset({"minProperties", "maxProperties"}))
            loosened += ("minProperties/maxProperties with optional properties",)
            matcher = self._matcher(schema, lenient=False)
        if matcher.get_error().startswith(_SUPERSET_ABLE):
            matcher = self._matcher(schema, lenient=True)
        if matcher.is_error():
            raise classify_error(matcher.get_error())
        exclusive = not overlapping_one_of(schema)
        return matcher, loosened + tuple(warning for warning in matcher.get_grammar_warnings()
                                         if not (exclusive and warning.startswith(_ONE_OF_COERCED)))

    def _matcher(self, schema: dict, *, lenient: bool) -> llguidance.LLMatcher:
        """Build a matcher with our options forced (``overrides`` win over a schema's own x-guidance)."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, overrides={**_JSON_OPTIONS, "coerce_one_of": True, "lenient": lenient})
        except ValueError as exc:  # the schema already passed meta-validation: this is an engine limit
            raise Unprocessable(f"The constraint engine could not read the schema: {exc}", param="schema") from None
        return llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self._limits)

    def _probe(self, template: llguidance.LLMatcher) -> None:
        """Compute a first mask on a copy: some grammar errors only surface when the lexer first runs."""
        probe = template.deep_copy()
        probe.compute_bitmask()
        if probe.is_error():
            raise classify_error(probe.get_error())


def _llama_tokenizer(llama_cpp: Any, vocab: Any, size: int) -> llguidance.LLTokenizer:
    """llguidance's view of a llama vocabulary (``llguidance.llamacpp`` without its deprecated llama.cpp calls)."""
    n_tokens = llama_cpp.llama_vocab_n_tokens(vocab)
    control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    buffer = ctypes.create_string_buffer(16 * 1024)
    pieces: list[bytes] = []
    for token in range(n_tokens):
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer) - 1, 0, True)
        if n < 0:
            raise ValueError(f"token {token} of the vocabulary is longer than {len(buffer)} bytes")
        piece = buffer.raw[:n]
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        user_special = attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED and piece[:1] == b"<" and piece[-1:] == b">"
        # A 0xff prefix marks special tokens, which the JSON grammar never allows inside the text.
        pieces.append(b"\xff" + piece if attr & control or user_special else piece)
    pieces.extend(b"" for _ in range(size - n_tokens))
    end_tokens = [t for t in range(n_tokens) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    tokenize = ctypes.cast(llama_cpp.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    return llguidance.LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
        tokens=pieces, vocab_ptr=vocab, tokenize_fptr=tokenize,
        eos_token=end_tokens or [llama_cpp.llama_vocab_eos(vocab)], slices=None)


def _vocab_pointer(source: Any) -> Any:
    """The llama_vocab pointer of a ``llama_cpp.Llama``, of an object with ``.vocab``, or the pointer itself."""
    if hasattr(source, "_model"):
        return source._model.vocab
    return getattr(source, "vocab", source)


def classify_error(message: str) -> ServiceError:
    """Turn an llguidance error into a 400 (the schema is broken) or a 422 (it cannot be enforced)."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    if first.startswith("Unimplemented keys:"):
        try:
            keys = ", ".join(json.loads(first.partition(":")[2]))
        except ValueError:
            keys = first.partition(":")[2].strip()
        return Unprocessable(f"The schema uses keywords the constraint engine cannot enforce: {keys}",
                             param="schema")
    if first.startswith("Unknown format:"):
        return Unprocessable(f"The schema uses a format the constraint engine cannot enforce:"
                             f"{first.partition(':')[2]}", param="schema")
    if "does not exist" in first and first.startswith(("Pointer", "Anchor")):
        return BadRequest(f"The schema has a $ref that points nowhere: {first}", param="schema")
    if "not present in a registry" in first:
        return Unprocessable(f"Only local $refs are supported: {first}", param="schema")
    if first.startswith("regex parse error"):
        detail = message.strip().splitlines()[-1]
        return Unprocessable(f"A pattern uses regex features the constraint engine cannot enforce: {detail}",
                             param="schema")
    if first in ("NoExtension", "NoExtensionBias"):
        return Unprocessable("No JSON value can be generated from the schema (does a $ref only lead back to "
                             "itself?).", param="schema")
    if first.startswith("Unable to determine if regex is empty"):
        return Unprocessable("The schema combines too many patterns or string constraints to enforce together.",
                             param="schema")
    if first.startswith("Unsatisfiable schema"):
        return Unprocessable(f"No JSON value can satisfy the schema: {first.partition(':')[2].strip()}",
                             param="schema")
    return Unprocessable(f"The constraint engine cannot enforce this schema: {first[:300]}", param="schema")


__all__ = ["ConstraintCompiler", "ConstraintState", "Grammar", "apply_bitmask", "check_schema", "classify_error",
           "validate_output"]
