"""French and English: the catalogues agree, every key the pages use exists, and no interface text is left outside
them (the chat page and the /stats page, their HTML and scripts)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

STATIC = Path(__file__).parent.parent / "static"
LOCALES = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in (STATIC / "locales").glob("*.json")}
SCRIPTS = {path.name: path.read_text(encoding="utf-8") for path in STATIC.glob("*.js")}
PAGES = ("index.html", "stats.html")
PLACEHOLDER = re.compile(r"\{(\w+)\}")
PLURAL_FORMS = {"en": {"one", "other"}, "fr": {"one", "many", "other"}}  # Intl.PluralRules categories


def forms(value) -> list[str]:
    return list(value.values()) if isinstance(value, dict) else [value]


def test_both_languages_have_the_same_keys_and_placeholders():
    assert set(LOCALES) == {"en", "fr"}
    assert set(LOCALES["en"]) == set(LOCALES["fr"])
    for key, english in LOCALES["en"].items():
        french = LOCALES["fr"][key]
        assert type(english) is type(french), key
        for lang, value in (("en", english), ("fr", french)):
            assert all(isinstance(text, str) and text.strip() for text in forms(value)), (lang, key)
            if isinstance(value, dict):
                assert "other" in value and set(value) <= PLURAL_FORMS[lang], (lang, key)
        names = {name for text in forms(english) for name in PLACEHOLDER.findall(text)}
        assert names == {name for text in forms(french) for name in PLACEHOLDER.findall(text)}, key


def used_keys() -> tuple[set[str], set[str]]:
    """Keys named literally (t('key'), data-i18n*="key", the directory template), and prefixes of keys built in a
    template string (t(`versions.${what}`))."""
    literal, prefixes = set(), set()
    sources = [*SCRIPTS.values(), *((STATIC / page).read_text(encoding="utf-8") for page in PAGES),
               (STATIC.parent / "llm" / "web" / "api" / "pages.py").read_text(encoding="utf-8")]
    for text in sources:
        literal |= set(re.findall(r"""\bt\(['"]([\w.]+)['"]""", text))
        literal |= set(re.findall(r"data-i18n(?:-label|-placeholder|-title)?=\"([\w.]+)\"", text))
        literal |= set(re.findall(r"t\[\"([\w.]+)\"\]", text))
        for quoted in re.findall(r"'([a-z_]+\.[a-z_]+)'", text):  # keys chosen by a condition, then passed to t
            literal.add(quoted)
        prefixes |= set(re.findall(r"t\(`([\w.]+)\$\{", text))
    return literal, prefixes


def test_every_key_used_exists_and_every_key_is_used():
    literal, prefixes = used_keys()
    catalogue = set(LOCALES["en"])
    assert {key for key in literal if "." in key and key.split(".")[0] in {k.split(".")[0] for k in catalogue}} \
        <= catalogue
    for prefix in prefixes:
        assert any(key.startswith(prefix) for key in catalogue), prefix
    unused = {key for key in catalogue if key not in literal and not any(key.startswith(p) for p in prefixes)}
    assert unused == set()


class _Texts(HTMLParser):
    """Text and labelling attributes of index.html that no data-i18n attribute covers."""

    def __init__(self):
        super().__init__()
        self.stack: list[dict] = []
        self.uncovered: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name, marker in (("aria-label", "data-i18n-label"), ("placeholder", "data-i18n-placeholder"),
                             ("title", "data-i18n-title")):
            if attrs.get(name) and marker not in attrs:
                self.uncovered.append(f"<{tag} {name}={attrs[name]!r}>")
        if tag not in ("meta", "link", "input", "br", "path", "circle"):
            self.stack.append(attrs)

    def handle_endtag(self, tag):
        if tag not in ("meta", "link", "input", "br", "path", "circle") and self.stack:
            self.stack.pop()

    def handle_data(self, data):
        words = re.findall(r"[A-Za-zÀ-ÿ]{2,}", data)
        if words and not (self.stack and "data-i18n" in self.stack[-1]):
            self.uncovered.append(data.strip())


@pytest.mark.parametrize("page", PAGES)
def test_the_pages_have_no_text_outside_the_catalogues(page):
    parser = _Texts()
    parser.feed((STATIC / page).read_text(encoding="utf-8"))
    assert parser.uncovered == []


# Calls that put words in front of the user: their text must come from t(), not a literal.
HARD_CODED = re.compile(r"(?:textContent\s*=|announce\(|showNotice\(|showBanner\(|setStatus\(|failAnswer\([^,]+,|"
                        r"setAttribute\('(?:aria-label|title|placeholder)',|element\('[\w-]+', '[^']*',|"
                        r"button\(|smallButton\(|\bel\(\"\w+\", \{[^}]*\},|label: |new Error\()\s*['`\"][^'`\"]*"
                        r"[A-Za-z]{2,}")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_scripts_write_no_words_of_their_own(name):
    offending = [line.strip() for line in SCRIPTS[name].splitlines()
                 if HARD_CODED.search(re.sub(r"\$\{[^}]*\}", "", line))]  # what ${...} inserts is not a word
    assert offending == []


def test_the_directory_page_speaks_the_browsers_language(client):
    with client.get("/chat", headers={"Accept-Language": "fr-CA,fr;q=0.9,en;q=0.5"}) as response:
        page = response.get_data(as_text=True)
    assert '<html lang="fr">' in page and "Clavarder avec une personnalité" in page and "Modèle : " in page
    with client.get("/chat", headers={"Accept-Language": "de-DE"}) as response:
        assert "Chat with a personality" in response.get_data(as_text=True)
