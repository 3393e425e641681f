"""Fetch a web page or feed for the prompt's context without letting the URL reach inside our network.

``SafeFetcher.fetch(url)`` follows redirects itself and, on every hop, refuses non-http(s) schemes and
credentials, applies the domain allow/deny lists, resolves the host once and refuses it if *any* address is
not public, then connects to one of exactly those addresses (``rag.pinning``). Bodies are streamed and cut
at ``fetch_max_bytes``; connect/read timeouts and a total deadline bound the time; only readable content
types are accepted. Results are cached for ``fetch_cache_seconds``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import requests
from urllib3.exceptions import HTTPError as Urllib3Error

from rag.addresses import PolicyError, Resolver, Target, check_domain, parse_target, resolve
from rag.pinning import Pin, PinnedAdapter, Watchdog
from rag.sniff import READABLE_TYPES, UNLABELLED_TYPES, parse_content_type, sniff

USER_AGENT = "llm-service-rag/0.1 (self-hosted assistant; fetches pages its users ask about)"
ACCEPT = ("text/html,application/xhtml+xml,application/rss+xml,application/atom+xml,"
          "application/xml;q=0.9,text/plain;q=0.8,*/*;q=0.1")
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 64 * 1024


class FetchError(Exception):
    """A URL that could not be fetched; ``reason`` is a short sentence fit to show the user."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"Could not fetch {url}: {reason}")
        self.url = url
        self.reason = reason


class FetchRefused(FetchError):
    """The policy forbids it: scheme, credentials, domain lists, address, size or content type."""


class FetchFailed(FetchError):
    """The network or the server failed: DNS, connection, timeout, HTTP error status."""


@dataclass(frozen=True)
class Fetched:
    """A successfully fetched resource: the URL asked for, where it ended up, its type and raw body."""

    url: str
    final_url: str
    content_type: str
    body: bytes


class FetchCache:
    """Bounded LRU cache of fetched resources with a time-to-live on an injectable clock."""

    def __init__(self, ttl: float, clock: Callable[[], float], max_entries: int = 64,
                 max_bytes: int = 64_000_000):
        self.ttl, self.clock = ttl, clock
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, tuple[float, Fetched]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Fetched | None:
        """The cached resource while it is fresh, else None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if self.clock() >= item[0]:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: str, value: Fetched) -> None:
        """Store a resource, evicting the least recently used beyond the size bounds."""
        if self.ttl <= 0 or len(value.body) > self.max_bytes:
            return
        with self._lock:
            self._items[key] = (self.clock() + self.ttl, value)
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries or self._size() > self.max_bytes:
                self._items.popitem(last=False)

    def _size(self) -> int:
        return sum(len(fetched.body) for _, fetched in self._items.values())


class SafeFetcher:
    """Fetches http(s) resources under the SSRF policy; one instance per app, safe to share between threads.

    ``session_factory`` makes a fresh requests-like session per request (no cookies carried over);
    ``resolver`` has ``socket.getaddrinfo``'s signature; ``clock`` drives the cache; ``total_timeout``
    (default three times ``fetch_timeout``) bounds a whole fetch, redirects included.
    """

    def __init__(self, settings: Any, session_factory: Callable[[], Any] | None = None,
                 resolver: Resolver | None = None, clock: Callable[[], float] = time.monotonic,
                 *, total_timeout: float | None = None):
        self.settings = settings
        self.session_factory = session_factory or requests.Session
        self.resolver = resolver or socket.getaddrinfo
        self.total_timeout = total_timeout or 3 * float(settings.fetch_timeout)
        self.cache = FetchCache(float(settings.fetch_cache_seconds), clock)

    def fetch(self, url: str) -> Fetched:
        """The resource at ``url``, from the cache when fresh; raises FetchRefused or FetchFailed."""
        url = url.strip()
        cached = self.cache.get(url)
        if cached is not None:
            return cached
        fetched = self._fetch_following_redirects(url)
        self.cache.put(url, fetched)
        return fetched

    def check(self, url: str) -> Target:
        """Validate and resolve ``url`` without connecting; raises FetchRefused or FetchFailed."""
        try:
            target = parse_target(url)
            check_domain(target.host, allow=self.settings.fetch_allow_domains,
                         deny=self.settings.fetch_deny_domains)
            target.addresses = resolve(target, self.resolver,
                                       allow_loopback=bool(self.settings.unsafe_fetch_allow_loopback))
        except PolicyError as exc:
            raise FetchRefused(url, str(exc)) from None
        except LookupError as exc:
            raise FetchFailed(url, str(exc)) from None
        return target

    def _fetch_following_redirects(self, url: str) -> Fetched:
        """Fetch hop by hop, checking every redirect target like the first URL."""
        current = url
        with Watchdog(self.total_timeout) as watchdog:
            for _ in range(int(self.settings.fetch_max_redirects) + 1):
                outcome = self._fetch_one(url, self._check_hop(url, current), watchdog)
                if isinstance(outcome, Fetched):
                    return outcome
                current = outcome
        raise FetchRefused(url, f"it redirects more than {self.settings.fetch_max_redirects} times")

    def _check_hop(self, url: str, current: str) -> Target:
        """Check one hop; a refused redirect is reported against the URL the user gave."""
        try:
            return self.check(current)
        except FetchError as exc:
            if current == url:
                raise
            raise type(exc)(url, f"it redirects to {current}, and {exc.reason}") from None

    def _fetch_one(self, url: str, target: Target, watchdog: Watchdog) -> Fetched | str:
        """One request: the resource, or the next URL when the server redirects."""
        pin = Pin(target.addresses, float(self.settings.fetch_timeout))
        watchdog.watch(pin)
        session = self._new_session(pin)
        try:
            response = session.get(target.url, headers={"User-Agent": USER_AGENT, "Accept": ACCEPT,
                                                        "Accept-Encoding": "identity"},
                                   timeout=(self.settings.fetch_timeout, self.settings.fetch_timeout),
                                   allow_redirects=False, stream=True)
            try:
                return self._handle(url, target, response, watchdog)
            finally:
                response.close()
        except (requests.RequestException, Urllib3Error, OSError) as exc:
            late = watchdog.expired and f"it took longer than {self.total_timeout:g} s"
            raise FetchFailed(url, late or _network_reason(exc)) from None
        finally:
            session.close()

    def _new_session(self, pin: Pin) -> Any:
        """A fresh session without cookies, credentials or proxies (environment ignored), pinned to ``pin``."""
        session = self.session_factory()
        session.trust_env = False
        if getattr(session, "cookies", None) is not None:
            session.cookies.clear()
        session.auth = None
        session.proxies = {}
        adapter = PinnedAdapter(pin)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def _handle(self, url: str, target: Target, response: Any, watchdog: Watchdog) -> Fetched | str:
        """Turn a response into a redirect target, a Fetched, or a FetchError."""
        self._check_deadline(url, watchdog)  # an aborted read can look like a short, complete response
        status = int(response.status_code)
        if status in REDIRECT_CODES:
            location = response.headers.get("Location")
            if not location:
                raise FetchFailed(url, f"the server answered HTTP {status} without a Location")
            return urljoin(target.url, location)
        if not 200 <= status < 300:
            raise FetchFailed(url, f"the server answered HTTP {status}")
        header = response.headers.get("Content-Type", "")
        mime, _ = parse_content_type(header)
        if mime not in READABLE_TYPES and mime not in UNLABELLED_TYPES:
            raise FetchRefused(url, f"its content type {mime} is not a page, feed or text")
        body = self._read_body(url, response, watchdog)
        if mime in UNLABELLED_TYPES and sniff(body) is None:
            raise FetchRefused(url, f"its content ({mime or 'unlabelled'}) is not a page, feed or text")
        return Fetched(url=url, final_url=target.url, content_type=header, body=body)

    def _read_body(self, url: str, response: Any, watchdog: Watchdog) -> bytes:
        """Stream the body, giving up as soon as it passes ``fetch_max_bytes`` or the deadline."""
        limit = int(self.settings.fetch_max_bytes)
        declared = str(response.headers.get("Content-Length", "")).strip()
        if declared.isdigit() and int(declared) > limit:
            raise FetchRefused(url, f"it is larger than the {limit} byte limit ({declared} bytes)")
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(chunk_size=CHUNK_BYTES):
            size += len(chunk)
            if size > limit:
                raise FetchRefused(url, f"it is larger than the {limit} byte limit")
            self._check_deadline(url, watchdog)
            chunks.append(chunk)
        self._check_deadline(url, watchdog)
        return b"".join(chunks)

    def _check_deadline(self, url: str, watchdog: Watchdog) -> None:
        """Fail once the total time limit has passed."""
        if watchdog.expired:
            raise FetchFailed(url, f"it took longer than {self.total_timeout:g} s")


def _network_reason(exc: BaseException) -> str:
    """A short, user-facing phrase for a network failure."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "its TLS certificate could not be verified"
    if isinstance(exc, requests.Timeout):
        return "the server did not answer in time"
    if isinstance(exc, requests.ConnectionError):
        return "the connection failed"
    return f"the download failed ({type(exc).__name__})"
