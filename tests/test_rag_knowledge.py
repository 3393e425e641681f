"""Knowledge files: chunking, BM25 ranking, accent-insensitive matching, index rebuilds on change."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from rag.knowledge import KnowledgeBase, KnowledgeError, chunk
from rag.text import fold, mentions, tokenize
from tests.rag_support import FIXTURES


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    guide, recettes = tmp_path / "guide.md", tmp_path / "recettes.md"
    shutil.copy(FIXTURES / "guide.md", guide)
    shutil.copy(FIXTURES / "recettes.md", recettes)
    return guide, recettes


@pytest.mark.parametrize(("question", "heading"), [
    ("How do I clean the widget?", "Widget guide > Cleaning"),
    ("Is water damage covered by the warranty?", "Widget guide > Warranty"),
    ("how long does the first start take after connecting the power cable", "Widget guide > Installation"),
])
def test_bm25_picks_the_right_passage(files: tuple[Path, Path], question: str, heading: str) -> None:
    results = KnowledgeBase().search(question, list(files))
    assert results[0].heading == heading
    assert results[0].file == "guide.md"
    assert results[0].score > (results[1].score if len(results) > 1 else 0)


def test_french_accents_fold(files: tuple[Path, Path]) -> None:
    results = KnowledgeBase().search("recette du GATEAU aux pommes, temperature du four ?", list(files))
    assert results[0].heading == "Recettes de saison > Gâteau aux pommes"
    assert KnowledgeBase().search("soupe ete", list(files))[0].heading.endswith("Soupe d'été")


def test_unrelated_question_finds_nothing(files: tuple[Path, Path]) -> None:
    assert KnowledgeBase().search("quantum chromodynamics", list(files)) == []
    assert KnowledgeBase().search("the of and", list(files)) == []


def test_index_is_cached_and_rebuilt_when_the_file_changes(files: tuple[Path, Path]) -> None:
    guide, _ = files
    base = KnowledgeBase()
    first = base.index(guide)
    assert base.index(guide) is first
    guide.write_text("# Batteries\n\nThe battery lasts nine hours.\n", encoding="utf-8")
    stat = guide.stat()
    os.utime(guide, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert base.index(guide) is not first
    assert base.search("battery hours", [guide])[0].text == "The battery lasts nine hours."


def test_missing_file_is_a_knowledge_error(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeError, match="nope.md could not be read"):
        KnowledgeBase().index(tmp_path / "nope.md")


def test_chunks_follow_headings_and_stay_between_100_and_200_words() -> None:
    paragraph = " ".join(f"word{n}." for n in range(70))
    text = "# Title\n\n" + "\n\n".join([paragraph] * 5) + "\n\n## Short\n\nTiny section.\n\n" + \
        "## Huge\n\n" + " ".join(f"w{n}" for n in range(450))
    chunks = chunk(text)
    sizes = [(heading, len(body.split())) for heading, body in chunks]
    assert all(size <= 200 for _, size in sizes)
    assert [size for heading, size in sizes if heading == "Title"] == [140, 140, 70]
    assert ("Title > Short", 2) in sizes
    assert [size for heading, size in sizes if heading == "Title > Huge"] == [200, 200, 50]


def test_code_fence_comments_are_not_headings() -> None:
    headings = {heading for heading, _ in chunk((FIXTURES / "guide.md").read_text(encoding="utf-8"))}
    assert headings == {"Widget guide", "Widget guide > Installation", "Widget guide > Cleaning",
                        "Widget guide > Warranty"}


def test_tokenizer_is_unicode_aware() -> None:
    assert fold("Météo ÉTÉ straße") == "meteo ete strasse"
    assert tokenize("L'école des Élèves, 2024!") == ["ecole", "eleve", "2024"]
    assert tokenize("東京の天気") == ["東", "京", "の", "天", "気"]


@pytest.mark.parametrize(("text", "keywords", "match", "expected"), [
    ("What's the météo today?", ["meteo"], "any", True),
    ("METEO please", ["Météo"], "any", True),
    ("meteorology class", ["meteo"], "any", False),
    ("stock market news", ["stock market"], "any", True),
    ("stock   Market", ["stock market"], "all", True),
    ("weather in Paris", ["weather", "Paris"], "all", True),
    ("weather in Lyon", ["weather", "Paris"], "all", False),
    ("weather in Lyon", ["weather", "Paris"], "any", True),
    ("I love C++ code", ["c++"], "any", True),
    ("nothing", [], "any", False),
])
def test_keyword_mentions(text: str, keywords: list[str], match: str, expected: bool) -> None:
    assert mentions(text, keywords, match=match) is expected
