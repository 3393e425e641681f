"""Readable text from a fetched resource: an HTML page's main content, a feed's entries, or plain text.

HTML keeps the title and the main content (``<main>``, role=main, ``<article>``), dropping navigation,
banners, footers, asides, scripts and styles. Feeds are parsed by feedparser from the bytes we fetched (never
from a URL or a file name). The reader is chosen by ``rag.sniff.kind_of``, so mislabelled bodies are read
for what they are.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass
from typing import Literal

import feedparser
from bs4 import BeautifulSoup, ParserRejectedMarkup, Tag, UnicodeDammit
from bs4.element import NavigableString, PageElement

from rag.fetch import Fetched
from rag.sniff import kind_of, parse_content_type

_JUNK_TAGS = frozenset("script style noscript template svg canvas iframe object embed button select input "
                       "textarea dialog link meta".split())
_LANDMARK_TAGS = frozenset({"nav", "aside", "menu"})
_LANDMARK_ROLES = frozenset({"navigation", "banner", "contentinfo", "complementary", "search", "menubar",
                             "toolbar", "dialog", "alertdialog"})
_SECTIONING = frozenset({"article", "aside", "main", "nav", "section"})
_BLOCK_TAGS = frozenset("p div section article main header footer h1 h2 h3 h4 h5 h6 ul ol li dl dt dd table "
                        "thead tbody tr td th blockquote pre figure figcaption address details summary br hr "
                        "form fieldset caption body".split())
_BREAK = "\ue000"  # private-use marker for block boundaries, turned into newlines at the end
_XML_PROLOGUE = re.compile(r"\A\s*<\?xml[^>]*\?>", re.IGNORECASE)


class ExtractError(ValueError):
    """A fetched body that cannot be read as a page, feed or text; the message is for the user."""


@dataclass(frozen=True)
class Entry:
    """One feed entry, as plain text."""

    title: str
    date: str
    summary: str
    link: str

    def as_text(self) -> str:
        """The entry as a few lines of context."""
        head = self.title or "(untitled)"
        if self.date:
            head += f" ({self.date})"
        lines = [f"- {head}"]
        if self.summary:
            lines.append(f"  {self.summary}")
        if self.link:
            lines.append(f"  {self.link}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Document:
    """Readable content of one resource; ``entries`` is filled for feeds (and ``text`` joins them)."""

    title: str
    text: str
    kind: Literal["html", "feed", "text"]
    entries: tuple[Entry, ...] = ()
    url: str | None = None


def extract(fetched: Fetched) -> Document:
    """Read a fetched resource with the reader its bytes call for; raises ExtractError."""
    mime, charset = parse_content_type(fetched.content_type)
    kind = kind_of(mime, fetched.body)
    if kind is None:
        raise ExtractError("it is binary data, not a page, feed or text")
    if kind == "feed":
        return extract_feed(fetched.body, fetched.content_type, fetched.final_url)
    if kind == "html":
        return extract_html(fetched.body, charset, fetched.final_url)
    is_xml = mime in ("application/xml", "text/xml")
    return extract_text(fetched.body, charset, fetched.final_url, markup=is_xml)


def _decode(body: bytes, charset: str | None, *, is_html: bool = False) -> str:
    """Bytes to text: the declared charset, else BOM/meta/detection, never failing."""
    dammit = UnicodeDammit(body, [charset] if charset else [], is_html=is_html)
    if dammit.unicode_markup is not None:
        return dammit.unicode_markup
    return body.decode("utf-8", errors="replace")


def _soup(markup: str) -> BeautifulSoup:
    """Parse with html.parser, sidestepping bs4's XML-as-HTML and looks-like-a-URL warnings."""
    try:
        return BeautifulSoup(_XML_PROLOGUE.sub("", markup, count=1) + "\n", "html.parser")
    except ParserRejectedMarkup:
        raise ExtractError("the page's markup could not be parsed") from None


def extract_html(body: bytes, charset: str | None = None, url: str | None = None) -> Document:
    """Title and main-content text of an HTML page."""
    soup = _soup(_decode(body, charset, is_html=True))
    containers = _main_content(soup)
    text = "\n".join(_visible_text(tag, sectioned=tag.name in _SECTIONING) for tag in containers)
    return Document(title=_title(soup), text=text.strip(), kind="html", url=url)


def _title(soup: BeautifulSoup) -> str:
    """The page title: <title>, else og:title, else the first heading."""
    candidates = [soup.title.get_text() if soup.title else ""]
    og = soup.find("meta", attrs={"property": "og:title"})
    if isinstance(og, Tag):
        candidates.append(str(og.get("content") or ""))
    heading = soup.find(["h1", "h2"])
    if heading:
        candidates.append(heading.get_text())
    return next((_squash(text) for text in candidates if _squash(text)), "")


def _main_content(soup: BeautifulSoup) -> list[Tag]:
    """The main content landmarks: <main>, role=main, the outermost article(s), else the whole body."""
    main = soup.find("main") or soup.find(attrs={"role": "main"})
    if isinstance(main, Tag):
        return [main]
    return _outermost(soup, "article") or [soup.body or soup]


def _outermost(root: Tag, name: str) -> list[Tag]:
    """Elements called ``name`` that are not inside another one (iterative: pages can nest deeply)."""
    found: list[Tag] = []
    stack: list[PageElement] = list(reversed(root.contents))
    while stack:
        node = stack.pop()
        if isinstance(node, Tag):
            if node.name == name:
                found.append(node)
            else:
                stack.extend(reversed(node.contents))
    return found


def _skipped(tag: Tag, sectioned: bool) -> bool:
    """Whether a reader would not take this element as content: code, landmarks, hidden, page banners.

    A header or footer is the page's banner/contentinfo only outside article, aside, main, nav, section.
    """
    if tag.name in _JUNK_TAGS or tag.name in _LANDMARK_TAGS:
        return True
    if tag.name in ("header", "footer") and not sectioned:
        return True
    if not tag.attrs:
        return False
    style = str(tag.get("style") or "").replace(" ", "").lower()
    return (str(tag.get("role") or "").lower() in _LANDMARK_ROLES or tag.has_attr("hidden")
            or str(tag.get("aria-hidden")).lower() == "true" or "display:none" in style)


def _visible_text(container: Tag, *, sectioned: bool = True) -> str:
    """The text a reader sees, one line per block element, whitespace collapsed; one pass, no recursion."""
    pieces: list[str] = []
    stack: list[tuple[PageElement | None, bool]] = [(child, sectioned) for child in reversed(container.contents)]
    while stack:
        node, inside = stack.pop()
        if node is None:  # the end of a block element
            pieces.append(_BREAK)
        elif type(node) is NavigableString:  # not comments, CDATA, doctypes: those are subclasses
            pieces.append(str(node))
        elif isinstance(node, Tag) and not _skipped(node, inside):
            if node.name in _BLOCK_TAGS:
                pieces.append(_BREAK)
                stack.append((None, inside))
            if node.name == "li":
                pieces.append("- ")
            inner = inside or node.name in _SECTIONING
            stack.extend((child, inner) for child in reversed(node.contents))
    lines = (_squash(line) for line in "".join(pieces).split(_BREAK))
    return "\n".join(line for line in lines if line)


def _squash(text: str) -> str:
    """Collapse runs of whitespace (including no-break spaces) to single spaces."""
    return " ".join(text.split())


def html_to_text(markup: str) -> str:
    """Plain text of an HTML fragment (feed summaries), on one or more lines."""
    if "<" not in markup and "&" not in markup:
        return _squash(markup)
    return _visible_text(_soup(markup))


def extract_feed(body: bytes, content_type: str = "", url: str | None = None) -> Document:
    """Title and entries of an RSS or Atom feed, parsed from bytes; raises ExtractError if unreadable."""
    headers = {"content-type": content_type or "application/xml", "content-location": url or ""}
    parsed = feedparser.parse(io.BytesIO(body), response_headers=headers, sanitize_html=True)
    feed_title = _squash(html_to_text(str(parsed.feed.get("title", ""))))
    entries = tuple(item for item in map(_entry, parsed.entries) if item.title or item.summary or item.link)
    if not entries and not feed_title:
        problem = parsed.get("bozo_exception")
        detail = f" ({_squash(str(problem))[:120]})" if problem else ""
        raise ExtractError(f"the feed could not be read{detail}")
    text = "\n".join(entry.as_text() for entry in entries)
    return Document(title=feed_title, text=text, kind="feed", entries=entries, url=url)


def _entry(item: feedparser.FeedParserDict) -> Entry:
    """One feedparser entry as plain text fields."""
    summary = item.get("summary") or ""
    if not summary and item.get("content"):
        summary = item["content"][0].get("value", "")
    parsed_date = item.get("published_parsed") or item.get("updated_parsed")
    date = time.strftime("%Y-%m-%d", parsed_date) if parsed_date else str(item.get("published", ""))
    return Entry(title=_squash(html_to_text(str(item.get("title", "")))), date=_squash(date),
                 summary=_squash(html_to_text(str(summary))), link=str(item.get("link", "")).strip())


def extract_text(body: bytes, charset: str | None = None, url: str | None = None, *,
                 markup: bool = False) -> Document:
    """Plain text (or tag-stripped generic XML), paragraphs kept; the first line serves as title."""
    text = _decode(body, charset)
    if markup:
        text = _visible_text(_soup(text))
    lines = [" ".join(line.split()) for line in text.replace("\r\n", "\n").split("\n")]
    cleaned = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    title = next((line for line in lines if line), "")[:120]
    return Document(title=title, text=cleaned, kind="text", url=url)
