"""Host and Origin checks and the security headers every response carries.

DNS rebinding makes a page on ``attacker.example`` reach a service bound to a laptop's 127.0.0.1 under the
attacker's host name; cross-site websocket hijacking opens a socket from another site's page with the user's
cookie. So a request whose ``Host`` is not an allowed name is refused (400), and a browser request (websocket
handshakes included) whose ``Origin`` is neither this service nor an origin in ``LLM_CORS_ORIGINS`` is refused
(403). Allowed hosts default to the loopback names plus ``HOST``; a service bound to every interface
(``HOST=0.0.0.0``) with no ``LLM_ALLOWED_HOSTS`` accepts any host name and says so at start-up.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from flask import Flask, current_app, request
from flask.wrappers import Response

from llm.errors import BadRequest, ServiceError

log = logging.getLogger(__name__)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
                                "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


class Forbidden(ServiceError):
    status = 403
    type = "forbidden"


def allowed_hosts(settings) -> frozenset[str] | None:
    """Host names (no port) this service answers to; None means any (bound to every interface, none listed)."""
    if settings.allowed_hosts:
        return frozenset(name.lower().strip("[]") for name in settings.allowed_hosts)
    if (settings.host or "") in WILDCARDS:
        return None
    return frozenset((*LOOPBACK_NAMES, settings.host.lower().strip("[]")))


def host_name(host: str) -> str:
    """``example.org:5000`` -> ``example.org``; ``[::1]:5000`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def check_host_and_origin() -> None:
    """before_request (first): refuse foreign Host headers and cross-site browser requests."""
    settings = current_app.extensions["llm"].settings
    hosts = current_app.extensions["llm_allowed_hosts"]
    host = request.headers.get("Host", "")
    if hosts is not None and host_name(host) not in hosts:
        raise BadRequest(f"Host {host[:100]!r} is not served here (LLM_ALLOWED_HOSTS).")
    origin = request.headers.get("Origin")
    if origin is None or origin in settings.cors_origins:
        return
    parts = urlsplit(origin)
    if parts.netloc.lower() != host.lower() or parts.scheme not in ("http", "https"):
        raise Forbidden(f"Requests from {origin[:100]!r} are not allowed (add it to LLM_CORS_ORIGINS).")


def add_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def install(app: Flask, settings) -> None:
    hosts = allowed_hosts(settings)
    if hosts is None:
        log.warning("HOST=%s accepts any Host header: set LLM_ALLOWED_HOSTS to the names users reach this service "
                    "by, to block DNS rebinding", settings.host)
    app.extensions["llm_allowed_hosts"] = hosts
    app.before_request(check_host_and_origin)
    app.after_request(add_security_headers)
