"""Regular expressions from clients, run in linear time.

JSON Schema patterns come from whoever sends the schema. Python's ``re`` backtracks: ``^((a+)+b|a*!)$`` against 26
letters takes seconds and holds the interpreter lock, freezing every other user. RE2 (Google's engine, through the
maintained ``google-re2`` bindings) matches in time linear in the input and bounds the memory a pattern may compile
to, so no pattern can stall the process. Patterns RE2 cannot run (backreferences, lookaround) are refused with a
422 before generation, which is also what the grammar engine (llguidance, likewise automaton-based) can enforce.

Patterns use ECMA-262 syntax (JSON Schema's); the one common difference from RE2, ``\\uXXXX`` escapes, is translated.
"""

from __future__ import annotations

import functools
import re

import re2

from llm.errors import Unprocessable

MAX_PATTERN_MEMORY = 8 << 20  # bytes RE2 may use for one compiled pattern; beyond it the pattern is refused
# \uXXXX (and \u{X...}) not preceded by an escaping backslash becomes RE2's \x{...}.
_UNICODE_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u(?:([0-9A-Fa-f]{4})|\{([0-9A-Fa-f]{1,6})\})")


class PatternError(ValueError):
    """A pattern RE2 cannot compile (unsupported syntax, or too large)."""


def _translate(pattern: str) -> str:
    return _UNICODE_ESCAPE.sub(lambda m: f"{m[1]}\\x{{{m[2] or m[3]}}}", pattern)


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str):
    """The compiled RE2 program for an ECMA-262 pattern; PatternError when RE2 cannot run it in bounded memory."""
    options = re2.Options()
    options.max_mem = MAX_PATTERN_MEMORY
    options.log_errors = False
    try:
        return re2.compile(_translate(pattern), options)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        raise PatternError(detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)) from None


def search(pattern: str, text: str) -> bool:
    """Whether the (unanchored, as JSON Schema says) pattern matches somewhere in ``text``."""
    return compile_pattern(pattern).search(text) is not None


def is_valid(pattern: str) -> bool:
    """Whether a string is a pattern that can be run safely (the ``regex`` format)."""
    try:
        compile_pattern(pattern)
    except PatternError:
        return False
    return True


def require(pattern: str, where: str = "pattern") -> None:
    """422 naming the pattern when it cannot be checked in linear time."""
    try:
        compile_pattern(pattern)
    except PatternError as exc:
        raise Unprocessable(f"The {where} {pattern[:120]!r} cannot be checked safely (backreferences, lookaround "
                            f"and very large repetitions are not supported): {exc}", param="schema") from None
