"""Who is asking: API keys (each key names a user), a trusted proxy's user header, or anonymous.

When ``LLM_API_KEYS`` is set every endpoint but ``/health``, the pages (``/``, ``/stats``: they hold no data and ask
for a key) and their static files needs a key, given as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
Browsers cannot put headers on a websocket, and a key in a URL ends up in logs, history and referrers, so the page
posts the key once to ``POST /auth/session`` and gets it back as an HttpOnly, SameSite=Strict cookie that every
later request and websocket handshake carries (``DELETE /auth/session`` forgets it). Keys are compared in constant
time, and each failed attempt counts against the address's ``LLM_AUTH_FAILURE_LIMIT``. ``X-Forwarded-User`` is
believed only from an address listed in ``LLM_TRUSTED_PROXIES``; anyone else could simply send it.
"""

from __future__ import annotations

import hashlib
import hmac

from flask import Blueprint, Flask, current_app, g, jsonify, request

from llm.errors import BadRequest, TooManyRequests, Unauthorized

OPEN_PATHS = ("/health", "/static/", "/auth/session")
PAGES = ("/", "/stats", "/favicon.ico")  # pages hold no data; they ask for a key and send it with every request
PAGE_PREFIXES = ("/chat/",)
ANONYMOUS = "anonymous"
COOKIE = "llm_api_key"

blueprint = Blueprint("auth", __name__)


def key_users(keys: tuple[str, ...]) -> list[tuple[bytes, str]]:
    """``user:key`` entries name their user; a bare key gets a stable pseudonym."""
    users = []
    for entry in keys:
        user, sep, key = entry.partition(":")
        if not sep:
            key, user = entry, "key-" + hashlib.sha256(entry.encode()).hexdigest()[:8]
        users.append((key.encode(), user))
    return users


def user_for_key(key: str) -> str | None:
    """The user a key names, comparing against every configured key in constant time."""
    presented, found = key.encode(), None
    for known, user in key_users(current_app.extensions["llm"].settings.api_keys):
        if hmac.compare_digest(presented, known) and found is None:
            found = user
    return found


def presented_key() -> str:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("X-API-Key") or request.cookies.get(COOKIE) or ""


def _open(path: str) -> bool:
    return path in PAGES or path.startswith(OPEN_PATHS + PAGE_PREFIXES)


def authenticate(key: str) -> str:
    """The key's user; an unknown key counts against the caller's address, which is throttled once spent."""
    failures = current_app.extensions["llm_auth_failures"]
    address = f"addr:{request.remote_addr}"
    if failures.spent(address):
        raise TooManyRequests("Too many failed authentications from this address; retry later.",
                              headers={"Retry-After": str(failures.retry_after(address))})
    user = user_for_key(key) if key else None
    if user is None:
        try:
            failures.charge_identity(address)
        except TooManyRequests:
            pass  # this attempt is refused as unauthorized; the next ones get 429
        raise Unauthorized("A valid API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>' "
                           "(the page asks for one).")
    return user


def identify() -> None:
    """before_request: set ``g.user`` or refuse the request."""
    settings = current_app.extensions["llm"].settings
    g.user = ANONYMOUS
    if settings.api_keys and not _open(request.path):
        g.user = authenticate(presented_key())
    forwarded = request.headers.get("X-Forwarded-User", "").strip()
    if forwarded and request.remote_addr in settings.trusted_proxies:
        g.user = forwarded[:128]


def current_user() -> str:
    return getattr(g, "user", ANONYMOUS)


@blueprint.post("/auth/session")
def start_session():
    """Exchange a key for an HttpOnly cookie, so the page never holds it in a URL (or in script-readable storage)."""
    body = request.get_json(silent=True) if request.is_json else None
    key = body.get("api_key") if isinstance(body, dict) else None
    if not isinstance(key, str) or not key.strip():
        raise BadRequest("Send {\"api_key\": \"...\"}.", param="api_key")
    settings = current_app.extensions["llm"].settings
    user = authenticate(key.strip()) if settings.api_keys else ANONYMOUS
    response = jsonify({"user": user})
    response.set_cookie(COOKIE, key.strip(), httponly=True, samesite="Strict", secure=request.is_secure, path="/")
    return response


@blueprint.delete("/auth/session")
def end_session():
    response = jsonify({"signed_out": True})
    response.delete_cookie(COOKIE, path="/", samesite="Strict")
    return response


def install(app: Flask, settings) -> None:
    from llm.limits import Budget

    app.extensions["llm_auth_failures"] = Budget(settings.auth_failure_limit, "LLM_AUTH_FAILURE_LIMIT")
    app.before_request(identify)
    app.register_blueprint(blueprint)
