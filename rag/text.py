"""Language-aware text helpers shared by keyword triggers and BM25: folding, tokenising, word matching.

Folding lower-cases with ``casefold`` and strips accents, so "Météo", "METEO" and "météo" are one word for
matching and ranking; tokens are Unicode words (CJK ideographs one by one), without common English and
French stop words, with light plural and -ing folding.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
STOPWORDS = frozenset(
    """a an and are as at be but by do does for from has have how i if in into is it its of on or that the
    their them then there these they this to was what when where which who why will with you your me my we
    our can could would should about au aux avec ce ces dans de des du elle en est et il ils je la le les
    leur lui ma mais me mes moi mon ne nous on ou par pas pour qu que qui sa se ses son sur ta te tes toi ton
    tu un une vos votre vous y est sont ete etre fait comme quoi quel quelle quels quelles""".split()
)


def fold(text: str) -> str:
    """Case- and accent-insensitive form of ``text`` (é -> e, ß -> ss, ﬁ -> fi)."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(char for char in decomposed if not unicodedata.combining(char))
    return unicodedata.normalize("NFC", stripped)


def _stem(word: str) -> str:
    """Fold plurals and -ing (cats -> cat, maisons -> maison, cleaning -> clean); crude but symmetric."""
    if len(word) > 5 and word.endswith("ing"):
        return word[:-3]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """Search terms of ``text``: folded Unicode words minus stop words and single letters."""
    words = _TOKEN.findall(fold(text))
    return [_stem(word) for word in words
            if word not in STOPWORDS and (len(word) > 1 or word.isdigit() or "\u3040" <= word <= "\ufaff")]


def keyword_pattern(keyword: str) -> re.Pattern[str] | None:
    """A folded, whole-word pattern for ``keyword`` (several words match across any whitespace)."""
    words = fold(keyword).split()
    if not words:
        return None
    body = r"\s+".join(re.escape(word) for word in words)
    return re.compile(rf"(?<!\w){body}(?!\w)")


def mentions(text: str, keywords: Iterable[str], *, match: str = "any") -> bool:
    """Whether ``text`` contains any (or all) of ``keywords`` as whole words, ignoring case and accents."""
    folded = fold(text)
    patterns = [keyword_pattern(keyword) for keyword in keywords]
    found = [pattern is not None and pattern.search(folded) is not None for pattern in patterns]
    if not found:
        return False
    return all(found) if match == "all" else any(found)
