"""Test helpers for rag/: a local fixture HTTP(S) server, a silent server, fake resolvers and sessions."""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import socket
import ssl
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from requests.structures import CaseInsensitiveDict

from llm.settings import Settings, load_settings

FIXTURES = Path(__file__).parent / "fixtures" / "rag"
BIG_BODY_BYTES = 50 * 1024 * 1024
_TYPES = {".html": "text/html; charset=utf-8", ".xml": "application/rss+xml", ".txt": "text/plain",
          ".md": "text/markdown"}


def rag_settings(**overrides: object) -> Settings:
    """Settings for tests: loopback allowed (the fixture server), short timeouts, small limits, no cache."""
    values: dict[str, object] = {
        "LLM_UNSAFE_FETCH_ALLOW_LOOPBACK_FOR_TESTS": True,
        "LLM_FETCH_TIMEOUT": 2,
        "LLM_FETCH_MAX_BYTES": 200_000,
        "LLM_FETCH_CACHE_SECONDS": 0,
    }
    values.update(overrides)
    return load_settings(environ={}, overrides=values)


class StaticResolver:
    """A getaddrinfo stand-in answering from a table of host -> addresses; records every lookup."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = table
        self.calls: list[str] = []

    def __call__(self, host: str, port: int, *args: object) -> list[tuple]:
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (address, port)) for address in self.table[host]]


class FixtureHandler(http.server.BaseHTTPRequestHandler):
    """Routes: /fixtures/<name>?type=, /redirect?to=, /status/<code>, /host, /big, /drip, /drip-headers."""

    server: FixtureHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        with self.server.lock:
            self.server.hits[parts.path] += 1
        route = parts.path.strip("/").split("/")[0]
        handler = getattr(self, "route_" + route.replace("-", "_"), None)
        try:
            if handler is None:
                self.send_error(404)
            else:
                handler(parts.path, query)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client gave up, as the tests intend

    def _send(self, body: bytes, content_type: str | None, status: int = 200, **headers: str) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def route_fixtures(self, path: str, query: dict[str, str]) -> None:
        file = FIXTURES / Path(path).name
        declared = query.get("type", _TYPES.get(file.suffix, "application/octet-stream"))
        self._send(file.read_bytes(), None if declared == "none" else declared)

    def route_redirect(self, path: str, query: dict[str, str]) -> None:
        self._send(b"", "text/plain", int(query.get("code", "302")), Location=query["to"])

    def route_status(self, path: str, query: dict[str, str]) -> None:
        self._send(b"<html><body>error page</body></html>", "text/html", int(path.rsplit("/", 1)[-1]))

    def route_host(self, path: str, query: dict[str, str]) -> None:
        host, cookie = self.headers.get("Host", ""), self.headers.get("Cookie", "none")
        auth = self.headers.get("Authorization", "none")
        body = (f"<html><title>Echo</title><body><p>Host header: {host}.</p><p>Cookie: {cookie}.</p>"
                f"<p>Authorization: {auth}.</p></body></html>")
        self._send(body.encode(), "text/html")

    def route_search(self, path: str, query: dict[str, str]) -> None:
        """SearXNG's JSON API as a stand-in: results on docs.example.org (one unreadable: its snippet is all there
        is), one off the asked domains, one not http; the query is echoed in ``query`` as SearXNG does."""
        if query.get("format") != "json":
            self._send(b"<html>results</html>", "text/html")
            return
        base = f"http://docs.example.org:{self.server.port}"
        results = [
            {"url": f"{base}/fixtures/article.html", "title": "Sourdough notes", "content": "Feed the starter."},
            {"url": f"http://elsewhere.example.net:{self.server.port}/fixtures/main.html", "title": "Off domain"},
            {"url": "ftp://docs.example.org/file.txt", "title": "Not the web"},
            {"url": f"{base}/status/500", "title": "Broken page", "content": "Starters like rye flour."},
        ]
        self._send(json.dumps({"query": query.get("q", ""), "results": results}).encode(), "application/json")

    def route_binary(self, path: str, query: dict[str, str]) -> None:
        self._send(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200), query.get("type", "image/png"))

    def route_big(self, path: str, query: dict[str, str]) -> None:
        """50 MB produced chunk by chunk, never held in memory; counts what was actually sent."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        if query.get("declare") == "1":
            self.send_header("Content-Length", str(BIG_BODY_BYTES))
        self.end_headers()
        chunk = (b"All work and no play makes Jack a dull boy. " * 1500)[:65536]
        for _ in range(BIG_BODY_BYTES // len(chunk)):
            if self.server.stopping.is_set():
                return
            self.wfile.write(chunk)
            with self.server.lock:
                self.server.sent["big"] += len(chunk)

    def route_drip(self, path: str, query: dict[str, str]) -> None:
        """Headers at once, then one byte every 50 ms for ever: each read is quick, the whole is endless."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self._drip(b"x")

    def route_drip_headers(self, path: str, query: dict[str, str]) -> None:
        """A status line, then header bytes one at a time, never finishing the headers."""
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        self._drip(b"a")

    def _drip(self, byte: bytes) -> None:
        while not self.server.stopping.wait(0.05):
            self.wfile.write(byte)
            self.wfile.flush()


class FixtureHTTPServer(http.server.ThreadingHTTPServer):
    """A threaded server whose handler threads are joined on close (no thread outlives a test)."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, tls: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), FixtureHandler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.hits: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.scheme = "https" if tls else "http"

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


@contextlib.contextmanager
def fixture_server(tls: ssl.SSLContext | None = None) -> Iterator[FixtureHTTPServer]:
    """Serve the routes above on 127.0.0.1 on a random port for the duration of the block."""
    server = FixtureHTTPServer(tls)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) but never sends a byte."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=8)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def self_signed_certificate(directory: Path, hostname: str) -> tuple[Path, Path] | None:
    """A certificate and key for ``hostname`` made with the openssl CLI, or None when it is missing."""
    if shutil.which("openssl") is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={hostname}",
         "-addext", f"subjectAltName=DNS:{hostname}"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


class FakeResponse:
    """Just enough of requests.Response for the fetcher: status, headers, streamed body, close."""

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None, body: bytes = b""):
        self.status_code = status
        self.headers = CaseInsensitiveDict(headers or {})
        self.body = body
        self.closed = False

    def iter_content(self, chunk_size: int = 1) -> Iterator[bytes]:
        for start in range(0, len(self.body), chunk_size):
            yield self.body[start:start + chunk_size]

    def close(self) -> None:
        self.closed = True


class FakeSessions:
    """A session factory whose sessions answer from ``respond(url)`` and record where they would connect.

    Each request records the URL and the pinned addresses of the adapter the fetcher mounted: exactly
    the addresses a real connection would have dialled.
    """

    def __init__(self, respond: Callable[[str], FakeResponse]):
        self.respond = respond
        self.requests: list[tuple[str, list[str]]] = []
        self.trust_env_seen: list[bool] = []

    def __call__(self) -> _FakeSession:
        return _FakeSession(self)


class _FakeSession:
    def __init__(self, owner: FakeSessions):
        self.owner = owner
        self.trust_env = True
        self.adapters: dict[str, object] = {}

    def mount(self, prefix: str, adapter: object) -> None:
        self.adapters[prefix] = adapter

    def get(self, url: str, **kwargs: object) -> FakeResponse:
        adapter = self.adapters["https://" if url.lower().startswith("https:") else "http://"]
        pinned = [str(address) for address in adapter.pin.addresses]  # type: ignore[attr-defined]
        self.owner.requests.append((url, pinned))
        self.owner.trust_env_seen.append(self.trust_env)
        return self.owner.respond(url)

    def close(self) -> None:
        pass
