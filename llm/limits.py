"""Limits at the door: request rate per API key (or user, or address), and CORS for browser clients.

Rate limiting uses flask-limiter with in-process storage (the service is one process); CORS uses flask-cors
and is off unless ``LLM_CORS_ORIGINS`` names the origins allowed to call the API from a browser.
"""

from __future__ import annotations

from flask import Flask, request
from flask_cors import CORS
from flask_limiter import Limiter

from llm.api.errors import error_response
from llm.auth import current_user, presented_key
from llm.errors import TooManyRequests

EXEMPT_PREFIXES = ("/health", "/static/", "/metrics")


def rate_key() -> str:
    """Each API key is limited on its own; without keys each user (or, anonymous, each address)."""
    key = presented_key()
    if key:
        return f"key:{key}"
    user = current_user()
    return f"user:{user}" if user != "anonymous" else f"addr:{request.remote_addr}"


def install(app: Flask, settings) -> None:
    """Apply LLM_RATE_LIMIT and LLM_CORS_ORIGINS to the app."""
    if settings.cors_origins:
        CORS(app, origins=list(settings.cors_origins), allow_headers=["Authorization", "Content-Type", "X-API-Key"],
             expose_headers=["X-Conversation", "X-Message-Id", "X-Finish-Reason", "X-Trimmed-Turns", "X-Sources",
                             "X-Notices", "Retry-After"])
    if settings.rate_limit:
        limiter = Limiter(rate_key, app=app, default_limits=[settings.rate_limit], storage_uri="memory://",
                          default_limits_exempt_when=lambda: request.path.startswith(EXEMPT_PREFIXES),
                          headers_enabled=True)
        app.extensions["llm_limiter"] = limiter

        @app.errorhandler(429)
        def too_many(error):
            retry = getattr(error, "retry_after", None) or 60
            return error_response(TooManyRequests(f"Rate limit exceeded ({settings.rate_limit}); retry in a moment.",
                                                  headers={"Retry-After": str(retry)}))
