"""The fetcher's network policy on its own: addresses, host spellings, URL forms and domain lists."""

from __future__ import annotations

import ipaddress

import pytest

from rag.addresses import PolicyError, address_problem, domain_matches, parse_inet_aton, parse_target
from rag.fetch import FetchFailed, FetchRefused, SafeFetcher
from tests.rag_support import StaticResolver, rag_settings

REFUSED = [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"), ("100.100.100.200", "metadata"),
    ("168.63.129.16", "metadata"), ("169.254.170.2", "metadata"),
    ("100.64.0.1", "shared"), ("100.127.255.254", "shared"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("239.1.2.3", "multicast"), ("ff02::1", "multicast"), ("224.0.1.1", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", ""), ("192.0.2.1", ""), ("198.18.0.1", ""),
    ("fc00::1", "private"), ("fd12:3456::1", "private"), ("2001:db8::1", ""),
    ("::ffff:127.0.0.1", "embeds 127.0.0.1"), ("::ffff:10.0.0.1", "embeds 10.0.0.1"),
    ("::ffff:169.254.169.254", "metadata"), ("::127.0.0.1", "embeds 127.0.0.1"),
    ("::ffff:0:127.0.0.1", "embeds 127.0.0.1"), ("2002:7f00:1::", "embeds 127.0.0.1"),
    ("2002:a9fe:a9fe::", "embeds 169.254.169.254"), ("64:ff9b::10.0.0.1", "embeds 10.0.0.1"),
    ("64:ff9b:1::1", ""), ("2001::1", ""),
]
PUBLIC = ["93.184.216.34", "1.1.1.1", "8.8.8.8", "2606:4700::1111", "2a00:1450:4007:80e::200e",
          "64:ff9b::8.8.8.8", "2002:0808:0808::1"]


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_special_addresses_are_refused(address: str, reason: str) -> None:
    problem = address_problem(ipaddress.ip_address(address))
    assert problem is not None
    assert reason in problem


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1"])
def test_test_setting_allows_loopback(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address), allow_loopback=True) is None


@pytest.mark.parametrize("address", ["10.0.0.1", "169.254.169.254", "fd00:ec2::254", "::ffff:127.0.0.1",
                                     "192.168.0.1", "100.64.0.1", "0.0.0.0", "::"])
def test_test_setting_allows_nothing_but_loopback(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address), allow_loopback=True) is not None


@pytest.mark.parametrize(("host", "expected"), [
    ("2130706433", "127.0.0.1"), ("017700000001", "127.0.0.1"), ("0x7f000001", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"), ("0x7F.0.0.1", "127.0.0.1"),
    ("10.1", "10.0.0.1"), ("2852039166", "169.254.169.254"), ("0xa9fea9fe", "169.254.169.254"),
    ("0", "0.0.0.0"), ("1.2.3.4", "1.2.3.4"), ("192.168.257", "192.168.1.1"),
])
def test_inet_aton_forms_are_read_like_the_socket_reads_them(host: str, expected: str) -> None:
    assert parse_inet_aton(host) == ipaddress.ip_address(expected)


@pytest.mark.parametrize("host", ["example.com", "1.2.3.4.5", "256.1.1.1", "08.1.1.1", "0x", "1..2", "",
                                  "4294967296", "1.2.3.4a"])
def test_names_are_not_mistaken_for_addresses(host: str) -> None:
    assert parse_inet_aton(host) is None


@pytest.mark.parametrize(("url", "message"), [
    ("file:///etc/passwd", "not file:"), ("ftp://example.com/x", "not ftp:"), ("gopher://127.0.0.1:70/", "gopher"),
    ("data:text/html,hello", "not data:"), ("javascript:alert(1)", "javascript"), ("//example.com/", "scheme"),
    ("example.com/page", "scheme"), ("http://evil@127.0.0.1/", "user name"),
    ("http://user:pass@example.com/", "user name"), ("http://example.com@127.0.0.1/", "user name"),
    ("http://example.com\\@127.0.0.1/", "backslash"), ("http://exa mple.com/", "spaces"),
    ("http://example.com/\r\nHost: evil", "control"), ("http:///nohost", "valid"), ("http://[::1/", "valid"),
])
def test_urls_refused_before_any_lookup(url: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_target(url)


def test_parse_target_normalises_like_requests() -> None:
    target = parse_target("HTTP://Bücher.Example./päge?q=1#frag")
    assert (target.scheme, target.host, target.port) == ("http", "xn--bcher-kva.example", 80)
    assert target.url.startswith("http://xn--bcher-kva.example./p%C3%A4ge?q=1")
    assert parse_target("https://[::1]:8443/").host == "[::1]"


@pytest.mark.parametrize(("host", "domains", "expected"), [
    ("example.org", ["example.org"], True), ("news.example.org", ["example.org"], True),
    ("a.b.example.org.", ["EXAMPLE.ORG"], True), ("evil-example.org", ["example.org"], False),
    ("example.org.evil.com", ["example.org"], False), ("org", ["example.org"], False),
    ("example.org", [], False),
])
def test_domain_lists_match_subdomains(host: str, domains: list[str], expected: bool) -> None:
    assert domain_matches(host, domains) is expected


def _fetcher(table: dict[str, list[str]], **settings: object) -> tuple[SafeFetcher, StaticResolver]:
    resolver = StaticResolver(table)
    return SafeFetcher(rag_settings(**settings), resolver=resolver), resolver


@pytest.mark.parametrize("url", [
    "http://2130706433/", "http://017700000001/", "http://0x7f.1/", "http://127.1/", "http://[::1]/",
    "http://[::ffff:127.0.0.1]/", "http://[0:0:0:0:0:ffff:7f00:1]/", "http://localhost./", "http://LOCALHOST/",
    "http://127.0.0.1.:8080/", "http://[::]/", "http://0/", "http://%31%32%37.0.0.1/", "http://127.000.000.001/",
    "http://00000177.0.0.1/", "http://0x00007f.1/", "http://[::127.0.0.1]/", "http://[0:0::1]/", "HTTP://127.0.0.1/",
])
def test_loopback_spellings_refused_without_the_test_setting(url: str) -> None:
    fetcher, _ = _fetcher({"localhost": ["127.0.0.1"]}, LLM_UNSAFE_FETCH_ALLOW_LOOPBACK_FOR_TESTS=False)
    with pytest.raises(FetchRefused):
        fetcher.check(url)


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/", "http://2852039166/", "http://0xa9.0xfe.0xa9.0xfe/",
    "http://[::ffff:169.254.169.254]/", "http://[fd00:ec2::254]/", "http://100.100.100.200/",
    "http://metadata.google.internal/computeMetadata/v1/", "http://10.1/", "http://[fe80::1%25eth0]/",
    "http://[2002:a9fe:a9fe::]/", "http://[64:ff9b::a9fe:a9fe]/",
])
def test_private_and_metadata_refused_even_with_loopback_allowed(url: str) -> None:
    fetcher, _ = _fetcher({"metadata.google.internal": ["93.184.216.34"]})
    with pytest.raises(FetchRefused):
        fetcher.check(url)


def test_a_name_resolving_to_a_private_address_is_refused() -> None:
    fetcher, resolver = _fetcher({"intranet.example.com": ["10.20.30.40"]})
    with pytest.raises(FetchRefused, match=r"address 10\.20\.30\.40 \(from intranet\.example\.com\) is private"):
        fetcher.check("https://intranet.example.com/")
    assert resolver.calls == ["intranet.example.com"]


def test_one_bad_address_among_several_refuses_the_host() -> None:
    fetcher, _ = _fetcher({"mixed.example.com": ["93.184.216.34", "2606:4700::1", "192.168.0.10"]})
    with pytest.raises(FetchRefused, match="192.168.0.10"):
        fetcher.check("http://mixed.example.com/")


def test_unknown_names_fail_rather_than_refuse() -> None:
    fetcher, _ = _fetcher({})
    with pytest.raises(FetchFailed, match="could not resolve nowhere.invalid"):
        fetcher.check("http://nowhere.invalid/")


def test_userinfo_is_refused_before_resolving() -> None:
    fetcher, resolver = _fetcher({"example.com": ["93.184.216.34"]})
    with pytest.raises(FetchRefused, match="user name or password"):
        fetcher.check("http://example.com@127.0.0.1/")
    assert resolver.calls == []


@pytest.mark.parametrize(("url", "allow", "deny", "ok"), [
    ("https://news.example.org/a", "example.org", "", True),
    ("https://example.org/a", "example.org", "", True),
    ("https://evil-example.org/a", "example.org", "", False),
    ("https://other.net/", "example.org,example.com", "", False),
    ("https://ads.example.org/", "example.org", "ads.example.org", False),
    ("https://tracker.ads.example.org/", "", "ads.example.org", False),
    ("https://example.org/", "", "ads.example.org", True),
    ("http://93.184.216.34/", "example.org", "", False),
])
def test_domain_allow_and_deny_lists(url: str, allow: str, deny: str, ok: bool) -> None:
    table = {host: ["93.184.216.34"] for host in
             ("news.example.org", "example.org", "evil-example.org", "other.net", "ads.example.org",
              "tracker.ads.example.org")}
    fetcher, _ = _fetcher(table, LLM_FETCH_ALLOW_DOMAINS=allow, LLM_FETCH_DENY_DOMAINS=deny)
    if ok:
        assert [str(a) for a in fetcher.check(url).addresses] == ["93.184.216.34"]
    else:
        with pytest.raises(FetchRefused, match="allow-list|deny-list"):
            fetcher.check(url)
