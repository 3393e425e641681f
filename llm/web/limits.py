"""Limits at the door: one request budget per user across every endpoint and channel, a throttle on failed
authentication, and CORS for browser clients.

The budget (``LLM_RATE_LIMIT``) is charged once per HTTP request and once per prompt on a websocket, against the
user the request authenticated as, or the client address when it is anonymous: a made-up ``X-API-Key`` never
buys a fresh bucket. Failed authentication is throttled per address (``LLM_AUTH_FAILURE_LIMIT``) whether or not a
budget is set. Counting uses the ``limits`` library (flask-limiter's own backend: moving windows, in-process
storage, since the service is one process); CORS uses flask-cors and is off unless ``LLM_CORS_ORIGINS`` names
origins.
"""

from __future__ import annotations

import time

from flask import Flask, current_app, g, request
from flask_cors import CORS
from limits import parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from llm.errors import ConfigError, TooManyRequests
from llm.web.auth import is_anonymous

EXEMPT_PREFIXES = ("/health", "/static/", "/metrics")
HANDSHAKE = "llm.websocket_handshake"  # environ flag: a socket's prompts are charged, not its handshake


class Budget:
    """Moving-window limits per identity; ``charge`` raises a 429 with Retry-After once a limit is spent."""

    def __init__(self, spec: str, what: str):
        try:
            self.items = parse_many(spec)
        except ValueError as exc:
            raise ConfigError(f"{what}: cannot read {spec!r}: {exc}") from None
        self.spec, self.what = spec, what
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def spent(self, identity: str) -> bool:
        return not all(self.limiter.test(item, identity) for item in self.items)

    def retry_after(self, identity: str) -> int:
        resets = [self.limiter.get_window_stats(item, identity).reset_time for item in self.items]
        return max(1, int(max(resets) - time.time()) + 1)

    def charge_identity(self, identity: str) -> None:
        if self.spent(identity) or not all(self.limiter.hit(item, identity) for item in self.items):
            raise TooManyRequests(f"Rate limit exceeded ({self.spec}); retry in a moment.",
                                  headers={"Retry-After": str(self.retry_after(identity))})

    def charge(self, user: str, address: str) -> None:
        """One unit for a request or a websocket prompt of this user (of this address when anonymous)."""
        self.charge_identity(identity(user, address))


def identity(user: str, address: str) -> str:
    """Whose budget: the user's, or the address's for anonymous callers (a browser's anonymous identity too:
    anyone can mint those by loading a page)."""
    return f"user:{user}" if user and not is_anonymous(user) else f"addr:{address}"


def charge_request() -> None:
    """before_request (after authentication): one unit of the caller's budget."""
    if request.path.startswith(EXEMPT_PREFIXES) or request.environ.get(HANDSHAKE):
        return
    current_app.extensions["llm_budget"].charge(g.get("user", "anonymous"), request.remote_addr or "")


def install(app: Flask, settings) -> None:
    """Apply LLM_RATE_LIMIT and LLM_CORS_ORIGINS to the app."""
    if settings.cors_origins:
        CORS(app, origins=list(settings.cors_origins), allow_headers=["Authorization", "Content-Type", "X-API-Key"],
             expose_headers=["X-Conversation", "X-Message-Id", "X-Finish-Reason", "X-Trimmed-Turns", "X-Sources",
                             "X-Notices", "Retry-After"])
    if settings.rate_limit:
        app.extensions["llm_budget"] = Budget(settings.rate_limit, "LLM_RATE_LIMIT")
        app.before_request(charge_request)
