"""``/toil/<personality>``: JSON in, JSON out, schema-valid by construction and checked before it leaves.

Decoding is constrained token by token to the schema (or to any JSON object without one); the finished text is
then parsed and validated with ``jsonschema``, and resampled when the grammar enforced only a superset
(``llm.web.api.structured``). A schema that is not valid is a 400, one that cannot be served a 422 naming why, an
answer cut off by the token limit a 422: a client never receives a document that does not validate. Clients may
set ``max_tokens`` (up to the context window; default: the room left in it) and ``timeout`` (seconds).
"""

from __future__ import annotations

import json
import re

from flask import Blueprint, Response, current_app, request

from llm.engine import JsonConstraint
from llm.errors import BadRequest
from llm.schema_support import check_schema, default_max_tokens
from llm.web.api import structured
from llm.web.api.gpt import sources_headers
from llm.web.auth import current_user

blueprint = Blueprint("toil", __name__)
URL = re.compile(r"^https?://\S+$", re.IGNORECASE)
FIELDS = {"prompt", "schema", "text", "session", "max_tokens", "timeout"}


SCHEMA_IN_PROMPT_CHARS = 2000  # about 600 tokens: a large schema would crowd the question out of the window


def instruction(schema) -> str:
    """Tell the model what is wanted; the constraint guarantees the structure, this makes the content sensible.
    A large schema is summarised by its top-level fields: the grammar carries the rest."""
    if schema is None:
        return "Answer with a JSON object."
    text = json.dumps(schema, ensure_ascii=False)
    if len(text) <= SCHEMA_IN_PROMPT_CHARS:
        return "Answer with JSON that follows this JSON Schema:\n" + text
    fields = list(schema.get("properties", {})) if isinstance(schema, dict) else []
    named = f" with the fields {', '.join(fields[:30])}" if fields else ""
    return f"Answer with a JSON document{named}."


def parse_body() -> dict:
    body = request.get_json(silent=True) if request.is_json else None
    if not isinstance(body, dict):
        raise BadRequest('The body must be a JSON object: {"prompt": "...", "schema": {...}}.')
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise BadRequest(f"Unknown fields: {', '.join(unknown)}. Allowed: {', '.join(sorted(FIELDS))}.")
    for name in ("text", "session"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise BadRequest(f"'{name}' must be a string.", param=name)
    return body


@blueprint.post("/toil/<personality>")
def toil(personality: str):
    """A JSON value that validates against the request's schema."""
    body = parse_body()
    schema = body.get("schema")
    if schema is not None:
        check_schema(schema)
    llm = current_app.extensions["llm"]
    chosen = llm.personalities.get(personality)  # 404 before any work
    window = llm.specs(chosen).context_window
    max_tokens, timeout = structured.client_limits(body, window)
    prompt = body.get("prompt")
    text = (body.get("text") or "").strip()
    if isinstance(prompt, str) and prompt.strip():
        if URL.match(text):  # a URL as text: fetched as context by the preprocessor
            prompt = f"{text} {prompt}"
            text = ""
        prompt = f"{prompt}\n\n{instruction(schema)}"
    # The room the value needs, estimated from the schema's bounds, up to the context window (the engine also
    # stops at what the prompt leaves of it).
    sampling = {"max_tokens": max_tokens or default_max_tokens(schema, window)}

    def start(options: dict, seconds: float):
        return llm.chat.start(personality, prompt, conversation_id=body.get("session"),
                              remember=body.get("session") is not None, constraint=JsonConstraint(schema),
                              extra_context=text, channel="toil", user=current_user(), sampling=options,
                              timeout=seconds)

    turn, value = structured.answer(start, schema, sampling, timeout, chosen)
    turn.finish()
    return Response(json.dumps(value, ensure_ascii=False), mimetype="application/json",
                    headers={**sources_headers(turn), **structured.headers(schema)})
