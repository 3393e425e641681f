"""The serving stack: uvicorn holds the connections, Flask answers HTTP in a thread pool, websockets are native.

A thread per connection (Werkzeug's server, gunicorn's gthread worker) lets 64 idle websockets or 80 clients that
send half a request line take every thread, and then nobody is served. Here an asyncio server (uvicorn) owns
every socket: an idle websocket or a half-sent request costs a few kilobytes, not a thread. Flask runs only once a
request's headers have fully arrived (a2wsgi's thread pool, ``LLM_HTTP_THREADS``), and a websocket takes a thread
only while an answer is being generated for it. On top of uvicorn's own limits (websocket ping and timeout, idle
keep-alive), ``GuardedH11Protocol`` closes connections whose request headers do not arrive within
``LLM_HEADER_TIMEOUT`` seconds and refuses more than ``LLM_MAX_CONNECTIONS_PER_ADDRESS`` from one address, and a
request body that stops arriving for as long is treated as a disconnect (the Flask thread is freed).

Both ``make run`` and ``make serve`` (and the Docker image) use this stack: one process, since the model lives
in it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

import uvicorn
from a2wsgi import WSGIMiddleware
from flask import Flask, request
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
DISCONNECT = "llm.disconnect"  # scope key of the request's Disconnect signal


class Disconnect:
    """Set when an HTTP client goes away; routes register callbacks (cancel the engine request) on it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._callbacks: list = []
        self._lock = threading.Lock()

    def fire(self) -> None:
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def register(self, callback) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()


def on_disconnect(callback) -> None:
    """Run ``callback`` (from another thread) if the current HTTP client disconnects before the answer ends.

    Outside this server (Flask's test client) nothing is registered: there the answer simply runs on."""
    signal = request.environ.get("asgi.scope", {}).get(DISCONNECT)
    if signal is not None:
        signal.register(callback)


class ServiceApp:
    """The ASGI application: HTTP to Flask through a thread pool, websockets to ``llm.web.api.socket``."""

    def __init__(self, flask_app: Flask):
        self.flask = flask_app
        settings = flask_app.extensions["llm"].settings
        self.settings = settings
        self.wsgi = WSGIMiddleware(flask_app, workers=settings.http_threads)

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            from llm.web.api.socket import serve_websocket

            await serve_websocket(self.flask, scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: dict, receive, send) -> None:
        """Feed a2wsgi from a queue while watching for the client leaving, which uvicorn otherwise only shows as
        sends that silently go nowhere (a streaming answer would run on for no one)."""
        signal = Disconnect()
        inbox: asyncio.Queue = asyncio.Queue()
        patience = self.settings.header_timeout

        async def pump() -> None:
            body_pending = True
            while True:
                try:  # a body must keep arriving, or it would hold a Flask thread for as long as it trickles
                    message = await (asyncio.wait_for(receive(), patience) if body_pending else receive())
                except TimeoutError:
                    message = {"type": "http.disconnect"}
                body_pending = message["type"] == "http.request" and message.get("more_body", False)
                await inbox.put(message)
                if message["type"] == "http.disconnect":
                    signal.fire()
                    return

        pumping = asyncio.get_running_loop().create_task(pump())
        try:
            await self.wsgi({**scope, DISCONNECT: signal}, inbox.get, send)
        finally:
            pumping.cancel()

    @staticmethod
    async def _lifespan(receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a header-read timeout and a cap on connections per client address."""

    header_timeout: float = 10.0
    max_per_address: int = 256
    exempt: frozenset = frozenset()  # trusted proxies: every client arrives from their address

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = self.client[0] if self.client else None
        if self.max_per_address and address not in self.exempt:
            same = sum(1 for conn in self.connections if getattr(conn, "client", None) and conn.client[0] == address)
            if same > self.max_per_address:
                log.warning("refused a connection from %s: %d open (LLM_MAX_CONNECTIONS_PER_ADDRESS)", address, same)
                transport.close()
                return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:
            self._disarm_header_timer()  # a whole request head arrived
        elif self.cycle is None or self.cycle.response_complete:
            self._arm_header_timer()  # part of a head: the clock started at its first byte keeps running

    def handle_websocket_upgrade(self, event) -> None:
        self._disarm_header_timer()  # the websocket protocol takes the connection over, with its own pings
        self._upgraded = True
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm_header_timer()

    def _arm_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is None and self.header_timeout and not getattr(self, "_upgraded",
                                                                                                False):
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


def uvicorn_config(asgi: ServiceApp, settings: Any, **overrides: Any) -> uvicorn.Config:
    """The server's settings, shared by ``make run``, ``make serve`` and the tests' live servers."""
    protocol = type("Guarded", (GuardedH11Protocol,), {
        "header_timeout": settings.header_timeout, "max_per_address": settings.max_connections_per_address,
        "exempt": frozenset(settings.trusted_proxies)})
    options = dict(host=settings.host, port=settings.port, http=protocol, ws="websockets-sansio",
                   ws_ping_interval=settings.ws_ping_interval, ws_ping_timeout=settings.ws_ping_interval,
                   ws_max_size=settings.max_body_bytes, timeout_keep_alive=5, lifespan="on",
                   log_config=None, access_log=False, server_header=False)
    return uvicorn.Config(asgi, **{**options, **overrides})


def serve(flask_app: Flask, on_started=None) -> None:
    """Run until interrupted (``make run`` / ``make serve``); ``on_started(server)`` runs in a thread once the
    socket listens (it may set ``server.should_exit``)."""
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # our own start-up line says where to go
    server = uvicorn.Server(uvicorn_config(ServiceApp(flask_app), flask_app.extensions["llm"].settings))
    if on_started is not None:
        original = server.startup

        async def startup(sockets=None) -> None:
            await original(sockets)
            if server.started:
                threading.Thread(target=on_started, args=(server,), name="announce", daemon=True).start()

        server.startup = startup
    server.run()


class BackgroundServer:
    """The real stack on 127.0.0.1 (a free port) in a thread: for tests, the bench and the audit."""

    def __init__(self, flask_app: Flask, host: str = "127.0.0.1", **overrides: Any):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url, self.ws_url = f"http://{host}:{self.port}", f"ws://{host}:{self.port}"
        self.app = flask_app
        config = uvicorn_config(ServiceApp(flask_app), flask_app.extensions["llm"].settings, **overrides)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            self.thread.join(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
