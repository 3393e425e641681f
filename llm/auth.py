"""Who is asking: API keys (each key names a user), a trusted proxy's user header, or anonymous.

When ``LLM_API_KEYS`` is set every endpoint but ``/health``, the page and its static assets needs a key, given as
``Authorization: Bearer <key>``, ``X-API-Key: <key>`` or ``?api_key=<key>`` (the only way a browser can
authenticate a websocket or a page load). ``X-Forwarded-User`` is believed only from an address listed in
``LLM_TRUSTED_PROXIES``; anyone else could simply send it.
"""

from __future__ import annotations

import hashlib

from flask import Flask, current_app, g, request

from llm.errors import Unauthorized

OPEN_PATHS = ("/health", "/static/")
PAGES = ("/", "/stats")  # pages hold no data; they ask for a key and send it with every request
ANONYMOUS = "anonymous"


def key_users(keys: tuple[str, ...]) -> dict[str, str]:
    """``user:key`` entries name their user; a bare key gets a stable pseudonym."""
    users = {}
    for entry in keys:
        user, sep, key = entry.partition(":")
        if not sep:
            key, user = entry, "key-" + hashlib.sha256(entry.encode()).hexdigest()[:8]
        users[key] = user
    return users


def presented_key() -> str:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("X-API-Key") or request.args.get("api_key") or ""


def _open(path: str) -> bool:
    return path in PAGES or path.startswith(OPEN_PATHS)


def identify() -> None:
    """before_request: set ``g.user`` or refuse the request."""
    settings = current_app.extensions["llm"].settings
    g.user = ANONYMOUS
    if settings.api_keys and not _open(request.path):
        user = key_users(settings.api_keys).get(presented_key())
        if user is None:
            raise Unauthorized("A valid API key is required: send 'Authorization: Bearer <key>', "
                               "'X-API-Key: <key>' or '?api_key=<key>'.")
        g.user = user
    forwarded = request.headers.get("X-Forwarded-User", "").strip()
    if forwarded and request.remote_addr in settings.trusted_proxies:
        g.user = forwarded[:128]


def current_user() -> str:
    return getattr(g, "user", ANONYMOUS)


def install(app: Flask) -> None:
    app.before_request(identify)
