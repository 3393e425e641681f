"""SafeFetcher against a real local server: redirects, limits, timeouts, pinning, TLS, cache."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from rag.fetch import FetchFailed, FetchRefused, SafeFetcher
from tests.rag_support import (
    FakeResponse,
    FakeSessions,
    FixtureHTTPServer,
    StaticResolver,
    fixture_server,
    rag_settings,
    self_signed_certificate,
    silent_server,
)


@pytest.fixture(scope="module")
def server() -> Iterator[FixtureHTTPServer]:
    with fixture_server() as running:
        yield running


def fetcher(**settings: object) -> SafeFetcher:
    return SafeFetcher(rag_settings(**settings))


def test_fetches_a_page(server: FixtureHTTPServer) -> None:
    fetched = fetcher().fetch(server.url("/fixtures/main.html"))
    assert fetched.body.startswith(b"<!DOCTYPE html>")
    assert fetched.content_type.startswith("text/html")
    assert fetched.final_url == fetched.url == server.url("/fixtures/main.html")


def test_follows_redirects_and_reports_the_final_url(server: FixtureHTTPServer) -> None:
    target = server.url("/fixtures/rss.xml")
    hop = server.url("/redirect?code=301&to=" + quote(target, safe=""))
    fetched = fetcher().fetch(server.url("/redirect?to=" + quote(hop, safe="")))
    assert fetched.final_url == target
    assert b"<rss" in fetched.body


def test_relative_redirects_are_resolved(server: FixtureHTTPServer) -> None:
    fetched = fetcher().fetch(server.url("/redirect?code=307&to=/fixtures/atom.xml"))
    assert fetched.final_url == server.url("/fixtures/atom.xml")


def test_redirect_limit(server: FixtureHTTPServer) -> None:
    url = server.url("/fixtures/main.html")
    for _ in range(3):
        url = server.url("/redirect?to=" + quote(url, safe=""))
    with pytest.raises(FetchRefused, match="redirects more than 2 times"):
        fetcher(LLM_FETCH_MAX_REDIRECTS=2).fetch(url)
    assert fetcher(LLM_FETCH_MAX_REDIRECTS=3).fetch(url).final_url.endswith("/fixtures/main.html")


@pytest.mark.parametrize("target", [
    "http://169.254.169.254/latest/meta-data/iam/", "http://[fd00:ec2::254]/", "http://10.0.0.1/",
    "http://2852039166/", "http://[::ffff:169.254.169.254]/", "http://192.168.1.1:8080/admin",
    "file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO",
])
def test_redirects_to_forbidden_places_are_refused_even_with_loopback_allowed(
        server: FixtureHTTPServer, target: str) -> None:
    with pytest.raises(FetchRefused) as caught:
        fetcher().fetch(server.url("/redirect?to=" + quote(target, safe="")))
    assert "metadata" in caught.value.reason or "private" in caught.value.reason or \
        "only http and https" in caught.value.reason


def test_redirect_to_loopback_refused_without_the_test_setting() -> None:
    """A public page that redirects to 127.0.0.1: the second hop is checked and refused, never dialled."""
    def respond(url: str) -> FakeResponse:
        return FakeResponse(302, {"Location": "http://127.0.0.1:8080/admin"})
    sessions = FakeSessions(respond)
    safe = SafeFetcher(rag_settings(LLM_UNSAFE_FETCH_ALLOW_LOOPBACK_FOR_TESTS=False), session_factory=sessions,
                       resolver=StaticResolver({"public.example": ["93.184.216.34"]}))
    with pytest.raises(FetchRefused, match="127.0.0.1 is loopback"):
        safe.fetch("http://public.example/start")
    assert sessions.requests == [("http://public.example/start", ["93.184.216.34"])]
    assert sessions.trust_env_seen == [False]


def test_connects_to_the_checked_address_not_a_second_lookup(server: FixtureHTTPServer) -> None:
    """DNS rebinding: the resolver answers loopback once, then a private address; only one lookup happens
    and the connection goes to the address that was checked, with the name kept in the Host header."""
    class Rebinding(StaticResolver):
        def __call__(self, host: str, port: int, *args: object) -> list[tuple]:
            answer = super().__call__(host, port, *args)
            self.table[host] = ["10.0.0.1"]
            return answer
    resolver = Rebinding({"rebind.test": ["127.0.0.1"]})
    safe = SafeFetcher(rag_settings(), resolver=resolver)
    fetched = safe.fetch(server.url("/host", host="rebind.test"))
    assert f"Host header: rebind.test:{server.port}".encode() in fetched.body
    assert resolver.calls == ["rebind.test"]


def test_http_error_status_fails(server: FixtureHTTPServer) -> None:
    with pytest.raises(FetchFailed, match="HTTP 404"):
        fetcher().fetch(server.url("/status/404"))


@pytest.mark.parametrize(("path", "ok"), [
    ("/binary", False), ("/binary?type=application/octet-stream", False), ("/binary?type=application/pdf", False),
    ("/fixtures/main.html?type=application/octet-stream", True), ("/fixtures/rss.xml?type=none", True),
    ("/fixtures/notes.txt?type=none", True), ("/fixtures/main.html?type=application/json", False),
    ("/fixtures/main.html?type=text/plain", True), ("/fixtures/rss.xml?type=text/html", True),
])
def test_content_type_allow_list(server: FixtureHTTPServer, path: str, ok: bool) -> None:
    if ok:
        assert fetcher().fetch(server.url(path)).body
    else:
        with pytest.raises(FetchRefused, match="not a page, feed or text"):
            fetcher().fetch(server.url(path))


def test_declared_oversize_body_is_refused_at_once(server: FixtureHTTPServer) -> None:
    started = time.monotonic()
    with pytest.raises(FetchRefused, match="larger than the 200000 byte limit"):
        fetcher().fetch(server.url("/big?declare=1"))
    assert time.monotonic() - started < 2


def test_streamed_oversize_body_is_cut_at_the_limit(server: FixtureHTTPServer) -> None:
    """50 MB without Content-Length: reading stops just past the limit, long before the server is done."""
    started = time.monotonic()
    with pytest.raises(FetchRefused, match="larger than the 200000 byte limit"):
        fetcher().fetch(server.url("/big"))
    assert time.monotonic() - started < 3
    assert server.sent["big"] < 20 * 1024 * 1024


def test_a_server_that_never_answers_times_out() -> None:
    with silent_server() as port:
        started = time.monotonic()
        with pytest.raises(FetchFailed, match="did not answer in time"):
            fetcher(LLM_FETCH_TIMEOUT=0.3).fetch(f"http://127.0.0.1:{port}/")
        assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_a_slow_drip_server_hits_the_total_deadline(server: FixtureHTTPServer, path: str) -> None:
    safe = SafeFetcher(rag_settings(LLM_FETCH_TIMEOUT=0.5), total_timeout=0.8)
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="took longer than 0.8 s"):
        safe.fetch(server.url(path))
    assert time.monotonic() - started < 2


def test_cache_serves_repeats_until_the_ttl_passes(server: FixtureHTTPServer) -> None:
    now = [1000.0]
    safe = SafeFetcher(rag_settings(LLM_FETCH_CACHE_SECONDS=60), clock=lambda: now[0])
    url = server.url("/fixtures/plain_body.html")
    before = server.hits["/fixtures/plain_body.html"]
    first = safe.fetch(url)
    now[0] += 59
    assert safe.fetch(url) is first
    assert server.hits["/fixtures/plain_body.html"] == before + 1
    now[0] += 2
    assert safe.fetch(url) == first
    assert server.hits["/fixtures/plain_body.html"] == before + 2


def test_cache_is_bounded() -> None:
    sessions = FakeSessions(lambda url: FakeResponse(200, {"Content-Type": "text/plain"}, url.encode()))
    safe = SafeFetcher(rag_settings(LLM_FETCH_CACHE_SECONDS=60), session_factory=sessions,
                       resolver=StaticResolver({"public.example": ["93.184.216.34"]}))
    for number in range(100):
        safe.fetch(f"http://public.example/{number}")
    safe.fetch("http://public.example/99")
    safe.fetch("http://public.example/0")
    assert len(sessions.requests) == 101


def test_no_cookies_or_environment_settings_are_used(server: FixtureHTTPServer, monkeypatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://10.0.0.1:3128")
    monkeypatch.setenv("http_proxy", "http://10.0.0.1:3128")
    made: list[requests.Session] = []

    def factory() -> requests.Session:
        session = requests.Session()
        session.cookies.set("secret", "value")
        session.auth = ("user", "password")
        session.proxies = {"http": "http://10.0.0.1:3128"}
        made.append(session)
        return session
    # A proxy from the environment would send the request to 10.0.0.1 and fail; it must be ignored.
    fetched = SafeFetcher(rag_settings(), session_factory=factory).fetch(server.url("/host"))
    assert b"Cookie: none." in fetched.body and b"Authorization: none." in fetched.body
    assert made and all(session.trust_env is False for session in made)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FixtureHTTPServer, Path]]:
    made = self_signed_certificate(tmp_path_factory.mktemp("tls"), "secure.test")
    if made is None:
        pytest.skip("openssl is not installed")
    cert, key = made
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with fixture_server(tls=context) as running:
        yield running, cert


def _tls_fetcher(cert: Path, host: str) -> SafeFetcher:
    def factory() -> requests.Session:
        session = requests.Session()
        session.verify = str(cert)
        return session
    return SafeFetcher(rag_settings(), session_factory=factory, resolver=StaticResolver({host: ["127.0.0.1"]}))


def test_tls_keeps_sni_and_certificate_checks_for_the_name(tls_server: tuple[FixtureHTTPServer, Path]) -> None:
    server, cert = tls_server
    fetched = _tls_fetcher(cert, "secure.test").fetch(server.url("/host", host="secure.test"))
    assert f"Host header: secure.test:{server.port}".encode() in fetched.body


def test_tls_certificate_for_another_name_is_rejected(tls_server: tuple[FixtureHTTPServer, Path]) -> None:
    server, cert = tls_server
    with pytest.raises(FetchFailed, match="certificate"):
        _tls_fetcher(cert, "impostor.test").fetch(server.url("/host", host="impostor.test"))
