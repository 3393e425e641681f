"""What a fetched body really is: the declared Content-Type, checked against the bytes themselves.

Servers mislabel: HTML served as text/plain, feeds as text/html or application/octet-stream. The fetcher
uses ``READABLE_TYPES`` and ``sniff`` to refuse what cannot be read; the extractor uses ``kind_of`` to pick
a reader.
"""

from __future__ import annotations

import re
from typing import Literal

Kind = Literal["html", "feed", "text"]

HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
FEED_TYPES = frozenset({"application/rss+xml", "application/atom+xml", "application/rdf+xml",
                        "application/x-rss+xml", "application/feed+xml"})
XML_TYPES = frozenset({"application/xml", "text/xml"})
TEXT_TYPES = frozenset({"text/plain", "text/markdown"})
UNLABELLED_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/unknown"})
# The allow-list: labelled types that are read as they are; unlabelled ones must sniff as html/feed/text.
READABLE_TYPES = HTML_TYPES | FEED_TYPES | XML_TYPES | TEXT_TYPES

_PROLOGUE = re.compile(rb"\A(?:\s+|<\?.*?\?>|<!--.*?-->|<!doctype[^>]*>)*", re.DOTALL | re.IGNORECASE)
_FEED_ROOT = re.compile(rb"<(?:rss|feed|rdf:rdf)[\s>/]")
_HTML_DOCTYPE = re.compile(rb"\A\s*(?:<\?xml[^>]*>\s*)?<!doctype\s+html", re.IGNORECASE)
# WHATWG MIME sniffing's HTML signatures: a tag name followed by a space or ">".
_HTML_START = re.compile(rb"<(?:html|head|body|script|iframe|h1|div|font|table|a|style|title|b|br|p|meta|"
                         rb"link|article|main|section|header|nav)[\s>/]")
_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def parse_content_type(header: str | None) -> tuple[str, str | None]:
    """The MIME type (lower case, no parameters) and the charset parameter, if any."""
    if not header:
        return "", None
    mime, _, params = header.partition(";")
    charset = None
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip("\"'").lower()
    return mime.strip().lower(), charset


def _ascii_head(body: bytes, size: int = 4096) -> bytes:
    """The start of the body as lower-case ASCII-compatible bytes, BOM and UTF-16 handled."""
    for bom, encoding in _BOMS:
        if body.startswith(bom):
            if encoding.startswith("utf-16"):
                text = body[len(bom):size * 2].decode(encoding, errors="replace")
                return text.encode("ascii", errors="replace").lower()
            return body[len(bom):size].lower()
    return body[:size].lower()


def sniff(body: bytes) -> Kind | None:
    """What the bytes look like: "feed", "html", "text", or None for binary data."""
    head = _ascii_head(body)
    rest = head[_PROLOGUE.match(head).end():]
    if _FEED_ROOT.match(rest):
        return "feed"
    if _HTML_DOCTYPE.match(head) or _HTML_START.match(rest):
        return "html"
    if _looks_binary(head):
        return None
    return "text"


def _looks_binary(head: bytes) -> bool:
    """NUL bytes or many control characters mean binary (images, archives, PDFs)."""
    if b"\x00" in head:
        return True
    controls = sum(1 for byte in head if byte < 32 and byte not in (9, 10, 12, 13, 27))
    return controls > max(1, len(head) // 100)


def declared_kind(mime: str) -> Kind | None:
    """What the Content-Type claims, when it claims something definite."""
    if mime in HTML_TYPES:
        return "html"
    if mime in FEED_TYPES:
        return "feed"
    if mime in TEXT_TYPES:
        return "text"
    return None


def kind_of(mime: str, body: bytes) -> Kind | None:
    """The reader to use: an unmistakable signature in the body wins over the label; None for binary."""
    sniffed = sniff(body)
    if sniffed in ("feed", "html") or sniffed is None:
        return sniffed
    return declared_kind(mime) or "text"
