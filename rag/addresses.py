"""The fetcher's network policy: which URLs, host names and IP addresses it may reach.

Kept apart from the HTTP code so the rules can be read, and tested, on their own. The fetcher parses a URL
the way requests/urllib3 will, refuses anything but plain http(s) without credentials, and checks every
address a host resolves to; the connection is then made to one of those checked addresses (see
``rag.pinning``), so a second DNS answer can never slip past these rules.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

import requests
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., Sequence[tuple]]

# Cloud instance metadata endpoints. Most are also link-local or private, but some (Azure's wireserver)
# are public addresses, so they are listed explicitly.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(text)
    for text in (
        "169.254.169.254", "169.254.170.2", "169.254.170.23", "169.254.169.123", "169.254.169.253",
        "100.100.100.200", "168.63.129.16", "192.0.0.192", "fd00:ec2::254", "fd00:ec2::23", "fd20:ce::254",
    )
)
METADATA_HOSTS = frozenset(
    ("metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal",
     "metadata.azure.internal", "metadata.tencentyun.com")
)
# Ranges refused even where the ipaddress module's notion of "global" is looser than ours.
_ALWAYS_REFUSED = tuple(
    ipaddress.ip_network(text)
    for text in (
        "0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
        "64:ff9b:1::/48", "2001::/23", "2001:db8::/32", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    )
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_TEST_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")
_V4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_INET_ATON_PART = re.compile(r"0x[0-9a-f]+|0[0-7]*|[1-9][0-9]*")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class PolicyError(ValueError):
    """A URL, host or address the policy refuses; the message says why, for the user."""


@dataclass
class Target:
    """One checked request target: the URL as it will be sent and the addresses it may connect to."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: list[IPAddress] = field(default_factory=list)


def address_problem(address: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why ``address`` may not be fetched (e.g. "is private"), or None when it is a public address."""
    if address in METADATA_ADDRESSES:
        return "is a cloud metadata address"
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        # Traffic to these forms ends up at the embedded IPv4 address (NAT64, 6to4, dual-stack sockets).
        inner = address_problem(embedded)
        return f"embeds {embedded}, which {inner}" if inner else None
    if allow_loopback and any(address in net for net in _TEST_LOOPBACK):
        return None
    return _category_problem(address)


def _category_problem(address: IPAddress) -> str | None:
    """The first special-purpose category ``address`` falls in, phrased for a message."""
    checks = (
        (address.is_unspecified, "is unspecified"),
        (address.is_loopback, "is loopback"),
        (address.is_link_local, "is link-local"),
        (address.is_multicast, "is multicast"),
        (address.version == 4 and address in _SHARED, "is shared address space (CGNAT)"),
        (address.is_reserved, "is reserved"),
        (address.is_private, "is private"),
        (address.version == 6 and address.is_site_local, "is site-local"),
        (any(address in net for net in _ALWAYS_REFUSED if net.version == address.version),
         "is special-purpose"),
        (not address.is_global, "is not a public address"),
    )
    return next((reason for failed, reason in checks if failed), None)


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address hidden in IPv4-mapped, -compatible, -translated, 6to4 and NAT64 IPv6 forms."""
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or address in _V4_TRANSLATED or (address in _V4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def parse_inet_aton(host: str) -> ipaddress.IPv4Address | None:
    """Read ``host`` the way inet_aton (and so getaddrinfo) does: 127.1, 0x7f.1, 017700000001, 2130706433."""
    parts = host.lower().split(".")
    if not 1 <= len(parts) <= 4 or not all(_INET_ATON_PART.fullmatch(part) for part in parts):
        return None
    values = [int(part, 16) if part.startswith("0x") else int(part, 8) if part.startswith("0") else int(part)
              for part in parts]
    last_bits = 8 * (5 - len(values))
    if any(value > 255 for value in values[:-1]) or values[-1] >= 1 << last_bits:
        return None
    number = values[-1]
    for index, value in enumerate(values[:-1]):
        number |= value << (24 - 8 * index)
    return ipaddress.IPv4Address(number)


def ip_literal(host: str) -> IPAddress | None:
    """The address a host string denotes by itself (IPv6 in brackets or any inet_aton IPv4 form), if any."""
    if host.startswith("[") and host.endswith("]"):
        inner = unquote(host[1:-1])
        try:
            return ipaddress.ip_address(inner)
        except ValueError:
            raise PolicyError(f"{host} is not a valid IPv6 address") from None
    return parse_inet_aton(host)


def parse_target(url: str) -> Target:
    """Normalise ``url`` exactly as requests will send it, refusing other schemes and credentials."""
    if any(char.isspace() or ord(char) < 32 or char == "\\" for char in url):
        raise PolicyError("the URL contains spaces, control characters or backslashes")
    scheme_match = _SCHEME.match(url)
    scheme = scheme_match.group(1).lower() if scheme_match else ""
    if scheme not in _DEFAULT_PORTS:
        shown = f"{scheme}:" if scheme else "a URL without a scheme"
        raise PolicyError(f"only http and https URLs are fetched, not {shown}")
    try:
        prepared = requests.PreparedRequest()
        prepared.prepare_url(url, None)
        parsed = parse_url(prepared.url)
    except (requests.RequestException, LocationParseError, ValueError, UnicodeError) as exc:
        raise PolicyError(f"the URL is not valid ({exc})") from None
    if parsed.auth is not None:
        raise PolicyError("URLs with a user name or password are not fetched")
    host = (parsed.host or "").lower().rstrip(".")
    if not host:
        raise PolicyError("the URL has no host")
    return Target(url=prepared.url, scheme=scheme, host=host, port=parsed.port or _DEFAULT_PORTS[scheme])


def domain_matches(host: str, domains: Iterable[str]) -> bool:
    """Whether ``host`` is one of ``domains`` or a subdomain of one."""
    host = host.lower().rstrip(".")
    for domain in domains:
        domain = domain.lower().strip().strip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def check_domain(host: str, *, allow: Sequence[str], deny: Sequence[str]) -> None:
    """Apply the deny-list, then the allow-list (when one is set), and the metadata host names."""
    bare = host.strip("[]")
    if bare in METADATA_HOSTS or domain_matches(bare, ("metadata.google.internal",)):
        raise PolicyError(f"{bare} is a cloud metadata host")
    if domain_matches(bare, deny):
        raise PolicyError(f"{bare} is on the deny-list (LLM_FETCH_DENY_DOMAINS)")
    if allow and not domain_matches(bare, allow):
        raise PolicyError(f"{bare} is not on the allow-list (LLM_FETCH_ALLOW_DOMAINS)")


def resolve(target: Target, resolver: Resolver, *, allow_loopback: bool) -> list[IPAddress]:
    """Every address the target's host stands for, each one checked; refuses if any is not public."""
    literal = ip_literal(target.host)
    if literal is not None:
        addresses = [literal]
    else:
        addresses = _lookup(target.host, target.port, resolver)
    for address in addresses:
        problem = address_problem(address, allow_loopback=allow_loopback)
        if problem:
            via = "" if literal is not None else f" (from {target.host})"
            raise PolicyError(f"address {address}{via} {problem}")
    return addresses


def _lookup(host: str, port: int, resolver: Resolver) -> list[IPAddress]:
    """Resolve a host name with the injected resolver (getaddrinfo's signature), de-duplicated in order."""
    try:
        infos = resolver(host, port, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise LookupError(f"could not resolve {host} ({exc})") from None
    addresses: list[IPAddress] = []
    for info in infos:
        try:
            address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        except (ValueError, IndexError, TypeError):
            raise PolicyError(f"{host} resolved to an unreadable address {info!r}") from None
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise LookupError(f"could not resolve {host} (no addresses)")
    return addresses
