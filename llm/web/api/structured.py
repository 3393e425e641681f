"""Schema-constrained answers for /toil and /v1: generate, validate against the exact schema, resample.

The grammar guarantees well-formed JSON, and the whole schema whenever llguidance can enforce it. Where it
enforces a superset (an overlapping ``oneOf``, ``not``, ``uniqueItems``, a format it does not know, keywords beside
a recursive ``$ref``), an answer can still fail the exact schema: it is then generated again with another seed,
up to ``LLM_SCHEMA_ATTEMPTS`` times within the request's time budget, and a 422 follows if none validates. An
answer cut off by the token limit is a 422 naming the limit. A 200 is always a document that validates.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from flask import current_app

from llm.conversation.service import ActiveTurn, sampling_for
from llm.errors import BadRequest, GenerationFailed, IncompleteOutput, Unprocessable
from llm.personalities import Personality
from llm.schema_support import unchecked_formats, validate_output
from llm.web.server import on_disconnect

RETRY_TEMPERATURE = 0.7  # a greedy personality would answer the same again: resamples need some temperature


def client_limits(body: dict, window: int) -> tuple[int | None, float]:
    """The client's ``max_tokens`` (up to the context window) and ``timeout`` seconds, validated."""
    settings = current_app.extensions["llm"].settings
    max_tokens, timeout = body.get("max_tokens"), body.get("timeout", settings.schema_timeout)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or not 1 <= max_tokens <= window):
        raise BadRequest(f"'max_tokens' must be an integer from 1 to the context window ({window}).",
                         param="max_tokens")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 1 <= timeout <= \
            settings.request_timeout:
        raise BadRequest(f"'timeout' must be a number of seconds from 1 to {settings.request_timeout} "
                         "(LLM_REQUEST_TIMEOUT).", param="timeout")
    return max_tokens, float(timeout)


def answer(start: Callable[[dict, float], ActiveTurn], schema: Any, sampling: dict, timeout: float,
           personality: Personality) -> tuple[ActiveTurn, Any]:
    """Run ``start(sampling, seconds_left)`` until an answer validates; returns that turn and its value."""
    attempts = current_app.extensions["llm"].settings.schema_attempts
    temperature = sampling_for(personality, sampling).temperature  # what the first attempt samples with
    deadline, failure = time.monotonic() + timeout, None
    for attempt in range(attempts):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        turn = start(sampling if attempt == 0 else _resampling(sampling, temperature), left)
        on_disconnect(turn.cancel)
        try:
            text = "".join(turn.pieces())
        finally:
            turn.cancel()
        if turn.handle.finish_reason == "length":
            _count("incomplete")
            raise IncompleteOutput(
                f"The JSON value was not complete after {turn.handle.usage.completion_tokens} tokens; nothing is "
                "returned rather than a truncated document. Raise max_tokens (up to the context window).")
        try:
            value = validate_output(schema, text)
        except GenerationFailed as error:
            failure = error
            continue
        _count("valid" if attempt == 0 else "valid_after_resampling")
        return turn, value
    _count("invalid")
    reason = failure.message if failure else "the time limit ran out"
    raise Unprocessable(f"No answer that validates against the schema within {attempts} attempts and "
                        f"{timeout:g} s ({reason}).", param="schema")


def _resampling(sampling: dict, temperature: float) -> dict:
    return {**sampling, "seed": random.getrandbits(31), "temperature": temperature or RETRY_TEMPERATURE}


def _count(outcome: str) -> None:
    observer = current_app.extensions.get("observability")
    if observer is not None:
        observer.metrics.schema_answers.labels(outcome).inc()


def headers(schema: Any) -> dict[str, str]:
    """Formats the schema names that nothing checks (annotations in 2020-12), said so in a header."""
    unchecked = unchecked_formats(schema)
    return {"X-Unchecked-Formats": ", ".join(unchecked)} if unchecked else {}
