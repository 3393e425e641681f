"""One error shape for every endpoint: ``{"error": {"message", "type", "status"}}``.

Werkzeug's own HTTP errors (unknown URL, wrong method, body too large) are rendered the same way, so a
client never has to parse an HTML error page. Under ``/v1`` the body follows OpenAI's shape instead.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from flask import Flask, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from llm.errors import ServiceError

log = logging.getLogger(__name__)

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_exceeded",
                 503: "server_error"}


def error_body(message: str, kind: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """The JSON body of an error, in Anthropic's shape under /v1/messages, OpenAI's elsewhere under /v1, ours
    everywhere else."""
    if request.path.startswith("/v1/messages"):
        from llm.web.api.anthropic import error_body as anthropic_error

        return anthropic_error(message, status)
    if request.path.startswith("/v1/"):
        return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"),
                          "param": param, "code": code or kind}}
    return {"error": {"message": message, "type": kind, "status": status}}


def error_response(error: ServiceError):
    """The JSON response for a ServiceError, with its status and headers (Retry-After...)."""
    code = getattr(error, "code", None)
    response = jsonify(error_body(error.message, error.type, error.status, error.param, code))
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


MAX_JSON_DEPTH = 100


def _check_value(value: Any) -> None:
    """Reject nesting deeper than MAX_JSON_DEPTH and strings that are not valid Unicode (lone surrogates)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            item.encode("utf-8")  # UnicodeEncodeError (a ValueError) on a lone surrogate
        elif isinstance(item, dict):
            stack.extend((key, depth + 1) for key in item)
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


class StrictJSONProvider(DefaultJSONProvider):
    """Request bodies that would crash code further in (recursion, lone surrogates) are simply not JSON.

    ``request.get_json(silent=True)`` then returns None and each endpoint answers its 400."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            value = super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
        _check_value(value)
        return value


def register_error_handlers(app: Flask) -> None:
    """Render ServiceError, HTTP errors and unexpected exceptions as JSON."""
    app.json = StrictJSONProvider(app)

    app.register_error_handler(ServiceError, error_response)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        kind = (error.name or "error").lower().replace(" ", "_")
        response = jsonify(error_body(error.description or error.name, kind, error.code or 500))
        response.status_code = error.code or 500
        return response

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        incident = uuid.uuid4().hex[:12]
        log.exception("unhandled error (incident %s)", incident,
                      extra={"event": "error", "incident": incident, "path": request.path})
        response = jsonify(error_body(f"Internal error (incident {incident}).", "internal_error", 500))
        response.status_code = 500
        return response
