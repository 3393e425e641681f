"""Who is asking: API keys (each key names a user), a trusted proxy's user header, or anonymous.

When ``LLM_API_KEYS`` is set every endpoint but ``/health``, the pages (``/``, ``/stats``: they hold no data and ask
for a key) and their static files needs a key, given as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
Browsers cannot put headers on a websocket, and a key in a URL ends up in logs, history and referrers, so the page
posts the key once to ``POST /auth/session`` and gets it back as an HttpOnly, SameSite=Strict cookie that every
later request and websocket handshake carries (``DELETE /auth/session`` forgets it). Keys are compared in constant
time, and each failed attempt counts against the address's ``LLM_AUTH_FAILURE_LIMIT``. ``X-Forwarded-User`` is
believed only from an address listed in ``LLM_TRUSTED_PROXIES``; anyone else could simply send it.

Without keys, each browser gets its own anonymous identity: loading a page sets ``llm_anon``, an HttpOnly,
SameSite=Strict cookie holding a random id signed with the service's secret (``LLM_SECRET_KEY``, else a random
one kept in ``LLM_DATA_DIR``), so one visitor's conversations never show in another's sidebar. Clients without
the cookie (curl, SDKs) share the user ``anonymous``. Rate budgets and socket caps still count anonymous callers
per address, so minting new identities buys nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from flask import Blueprint, Flask, current_app, g, jsonify, request

from llm.errors import BadRequest, TooManyRequests, Unauthorized

OPEN_PATHS = ("/health", "/static/", "/auth/session")
PAGES = ("/", "/stats", "/favicon.ico")  # pages hold no data; they ask for a key and send it with every request
PAGE_PREFIXES = ("/chat/",)
ANONYMOUS = "anonymous"
ANON_PREFIX = "anon-"  # users named by the anonymous cookie
COOKIE = "llm_api_key"
ANON_COOKIE = "llm_anon"
ANON_COOKIE_SECONDS = 365 * 24 * 3600

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


def is_anonymous(user: str) -> bool:
    """The shared anonymous user, or a browser's own anonymous identity (budgets count both per address)."""
    return user == ANONYMOUS or user.startswith(ANON_PREFIX)


def load_secret(settings) -> bytes:
    """LLM_SECRET_KEY, else a random secret created once in LLM_DATA_DIR (readable by the service only), so
    anonymous cookies survive restarts; replicas sharing a database must share LLM_SECRET_KEY too."""
    if settings.secret_key:
        return settings.secret_key.encode()
    path = Path(settings.data_dir).expanduser() / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def anonymous_cookie(ident: str) -> str:
    """The signed cookie value that names the anonymous identity ``ident`` (32 hex digits)."""
    signature = hmac.new(current_app.extensions["llm_secret"], ident.encode(), hashlib.sha256).hexdigest()[:32]
    return f"{ident}.{signature}"


def anonymous_user() -> str | None:
    """The user the request's signed anonymous cookie names, if it carries a valid one."""
    presented = request.cookies.get(ANON_COOKIE, "")
    ident = presented.partition(".")[0]
    if len(ident) == 32 and hmac.compare_digest(presented, anonymous_cookie(ident)):
        return ANON_PREFIX + ident
    return None


def give_anonymous_identity(response):
    """On a page load without keys: a browser without a valid anonymous cookie gets one."""
    if not current_app.extensions["llm"].settings.api_keys and anonymous_user() is None:
        response.set_cookie(ANON_COOKIE, anonymous_cookie(secrets.token_hex(16)), max_age=ANON_COOKIE_SECONDS,
                            httponly=True, samesite="Strict", secure=request.is_secure, path="/")
    return response


def identify() -> None:
    """before_request: set ``g.user`` or refuse the request."""
    settings = current_app.extensions["llm"].settings
    g.user = ANONYMOUS
    if settings.api_keys and not _open(request.path):
        g.user = authenticate(presented_key())
    elif not settings.api_keys:
        g.user = anonymous_user() or ANONYMOUS
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
    from llm.web.limits import Budget

    app.extensions["llm_auth_failures"] = Budget(settings.auth_failure_limit, "LLM_AUTH_FAILURE_LIMIT")
    app.extensions["llm_secret"] = load_secret(settings)
    app.before_request(identify)
    app.register_blueprint(blueprint)
