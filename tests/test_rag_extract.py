"""Reading fetched bodies: main-content HTML, RSS/Atom feeds, plain text, and mislabelled types."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag.extract import ExtractError, extract, extract_html
from rag.fetch import Fetched
from rag.sniff import kind_of, parse_content_type, sniff
from tests.rag_support import FIXTURES


def fetched(name: str, content_type: str) -> Fetched:
    url = f"http://site.test/{name}"
    return Fetched(url=url, final_url=url, content_type=content_type, body=(FIXTURES / name).read_bytes())


def test_realistic_page_keeps_main_content_only() -> None:
    document = extract(fetched("main.html", "text/html; charset=utf-8"))
    assert document.kind == "html"
    assert document.title == "Tidal Energy Explained | Example News"
    text = document.text
    for kept in ("Tidal energy, explained", "Sihwa Lake in South Korea, produces 254 megawatts.",
                 "tides are predictable years in advance", "- Few sites have a large enough tidal range.",
                 "Filed under Energy."):
        assert kept in text
    for dropped in ("Skip to content", "Home", "Search the site", "tracking", "dataLayer", "font-family",
                    "Buy our premium", "Related", "Most read", "Hidden newsletter", "All rights reserved",
                    "Privacy", "enable JavaScript", "trackScroll"):
        assert dropped not in text


def test_article_without_main() -> None:
    document = extract(fetched("article.html", "text/html"))
    assert document.text.splitlines() == [
        "Keeping a sourdough starter",
        "Feed the starter once a day with equal weights of flour and water. Keep it at room temperature.",
        "A healthy starter doubles in four to six hours.",
    ]


def test_page_without_landmarks_uses_the_body_minus_nav_and_footer() -> None:
    document = extract(fetched("plain_body.html", "text/html"))
    assert document.title == "Plain page"
    assert document.text == ("Opening hours\nThe library opens at nine. It closes at five on weekdays.\n"
                             "On Saturdays it closes at noon.")


def test_role_main_and_inline_markup() -> None:
    page = (b"<html><body><div role='navigation'>Menu</div><div role='main'><h1>Hi</h1>"
            b"<p>Read <a href='/d'>the docs</a>, then <b>build</b>.<br>Next line</p></div>"
            b"<div role='contentinfo'>Footer</div></body></html>")
    document = extract_html(page)
    assert document.text == "Hi\nRead the docs, then build.\nNext line"
    assert document.title == "Hi"


def test_rss_feed_entries() -> None:
    document = extract(fetched("rss.xml", "application/rss+xml"))
    assert document.kind == "feed"
    assert document.title == "Weather Service Bulletins"
    first = document.entries[0]
    assert first.title == "Storm warning for the coast"
    assert first.date == "2024-05-14"
    assert first.summary == "A strong storm reaches the coast tonight. Winds up to 120 km/h."
    assert first.link == "https://weather.example/bulletins/1"
    assert len(document.entries) == 3
    assert "alert" not in document.text


def test_atom_feed_entries() -> None:
    document = extract(fetched("atom.xml", "application/atom+xml"))
    assert document.title == "Project Changelog"
    assert [entry.title for entry in document.entries] == ["Version 2.0 released", "Version 1.9 released"]
    assert document.entries[0].summary == "Adds streaming and drops Python 3.8."
    assert document.entries[1].date == "2024-03-01"


def test_malformed_feed_is_an_extract_error() -> None:
    with pytest.raises(ExtractError, match="feed could not be read"):
        extract(fetched("malformed.xml", "application/rss+xml"))


@pytest.mark.parametrize(("name", "content_type", "kind"), [
    ("main.html", "text/plain", "html"),
    ("main.html", "application/octet-stream", "html"),
    ("main.html", "", "html"),
    ("rss.xml", "text/html", "feed"),
    ("atom.xml", "application/octet-stream", "feed"),
    ("atom.xml", "text/plain; charset=utf-8", "feed"),
    ("rss.xml", "application/xml", "feed"),
    ("notes.txt", "text/html", "html"),
    ("notes.txt", "application/octet-stream", "text"),
])
def test_lying_content_types_are_corrected_by_sniffing(name: str, content_type: str, kind: str) -> None:
    document = extract(fetched(name, content_type))
    assert document.kind == kind
    assert document.text


def test_plain_text_keeps_paragraphs() -> None:
    document = extract(fetched("notes.txt", "text/plain"))
    assert document.title == "Meeting notes, 3 June"
    assert "The budget was approved. Work starts in July.\nNext meeting: 10 June." in document.text


def test_charsets() -> None:
    latin = "<html><head><title>Café</title></head><body><p>Crème brûlée.</p></body></html>".encode("latin-1")
    document = extract(Fetched("u", "u", "text/html; charset=ISO-8859-1", latin))
    assert (document.title, document.text) == ("Café", "Crème brûlée.")
    utf16 = "\ufeff<html><body><main><p>Ünïcödé</p></main></body></html>".encode("utf-16-le")
    assert extract(Fetched("u", "u", "text/html", utf16)).text == "Ünïcödé"


def test_binary_is_refused() -> None:
    with pytest.raises(ExtractError, match="binary"):
        extract(Fetched("u", "u", "application/octet-stream", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"))


def test_content_type_parsing_and_sniffing() -> None:
    assert parse_content_type('Text/HTML; Charset="UTF-8"') == ("text/html", "utf-8")
    assert parse_content_type(None) == ("", None)
    assert sniff(b"  \n<?xml version='1.0'?>\n<!-- c -->\n<rss version='2.0'>") == "feed"
    assert sniff(b"<!DOCTYPE html><p>x") == "html"
    assert sniff(b"\xef\xbb\xbf<feed xmlns='http://www.w3.org/2005/Atom'>") == "feed"
    assert sniff(b"Just words.") == "text"
    assert sniff(b"PK\x03\x04\x00\x00") is None
    assert kind_of("application/xml", b"<root><a>1</a></root>") == "text"


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=600) | st.text(max_size=600).map(str.encode),
       content_type=st.sampled_from(["text/html", "text/plain", "application/rss+xml", "application/xml", ""]))
def test_extract_never_fails_unexpectedly(body: bytes, content_type: str) -> None:
    try:
        extract(Fetched("u", "u", content_type, body))
    except ExtractError:
        pass


def test_pathological_pages_stay_fast() -> None:
    """Deep nesting and nested banners are walked without recursion and in linear time."""
    started = time.monotonic()
    assert extract_html(b"<div>" * 20000 + b"deep text").text == "deep text"
    assert extract_html(b"<header><article>" * 3000 + b"inner").text == "inner"
    assert time.monotonic() - started < 3
