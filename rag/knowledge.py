"""Knowledge files: a personality's Markdown or text files, chunked and ranked against the question (BM25).

Each file is split at headings and paragraphs into passages of about 100-200 words (a passage keeps its
heading path, "Guide > Install", for context and for matching). A file's index is built once and rebuilt
when its modification time or size changes. Scores use Okapi BM25 with the document frequencies of all the
files searched together.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rag.budget import sentences
from rag.text import tokenize

MIN_WORDS = 100
MAX_WORDS = 200
MAX_FILE_BYTES = 20_000_000
_HEADING = re.compile(r"(#{1,6})\s+(\S.*)")
_FENCE = re.compile(r"^\s*(```|~~~)")


class KnowledgeError(OSError):
    """A knowledge file that cannot be read; the message names it."""


@dataclass(frozen=True)
class Passage:
    """One chunk of a knowledge file; ``score`` is its BM25 score for the question searched."""

    path: Path
    heading: str
    text: str
    score: float = 0.0

    @property
    def file(self) -> str:
        """The file name, used as the source title."""
        return self.path.name

    def as_text(self) -> str:
        """The passage as context, its heading path first."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


@dataclass
class _FileIndex:
    """BM25 statistics of one file at one (mtime, size)."""

    stamp: tuple[int, int]
    passages: list[Passage]
    lengths: list[int]
    postings: dict[str, list[tuple[int, int]]] = field(default_factory=dict)


def _sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading path, lines) per Markdown section; '#' lines inside code fences are not headings."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    trail: list[tuple[int, str]] = []
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        heading = None if in_fence else _HEADING.fullmatch(line)
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip().rstrip("#").strip()
            trail = [(lvl, name) for lvl, name in trail if lvl < level] + [(level, title)]
            sections.append((" > ".join(title for _, title in trail), []))
        else:
            sections[-1][1].append(line)
    return sections


def _pieces(paragraph: str) -> list[str]:
    """A paragraph as is, or split at sentences (then words) when longer than MAX_WORDS."""
    if len(paragraph.split()) <= MAX_WORDS:
        return [paragraph]
    pieces: list[str] = []
    current: list[str] = []
    for sentence in sentences(paragraph):
        words = sentence.split()
        while len(words) > MAX_WORDS:  # one enormous "sentence": cut it at words
            pieces.append(" ".join(words[:MAX_WORDS]))
            words = words[MAX_WORDS:]
        if current and len(current) + len(words) > MAX_WORDS:
            pieces.append(" ".join(current))
            current = []
        current.extend(words)
    if current:
        pieces.append(" ".join(current))
    return pieces


def chunk(text: str) -> list[tuple[str, str]]:
    """(heading path, passage text) pairs of about MIN_WORDS to MAX_WORDS words, never across headings."""
    chunks: list[tuple[str, str]] = []
    for heading, lines in _sections(text):
        paragraphs = [part.strip() for part in re.split(r"\n\s*\n", "\n".join(lines)) if part.strip()]
        buffer: list[str] = []
        size = 0
        for piece in (piece for paragraph in paragraphs for piece in _pieces(paragraph)):
            words = len(piece.split())
            if buffer and size + words > MAX_WORDS:
                chunks.append((heading, "\n\n".join(buffer)))
                buffer, size = [], 0
            buffer.append(piece)
            size += words
            if size >= MIN_WORDS:
                chunks.append((heading, "\n\n".join(buffer)))
                buffer, size = [], 0
        if buffer:
            chunks.append((heading, "\n\n".join(buffer)))
    return chunks


class KnowledgeBase:
    """BM25 search over knowledge files, with one cached index per file; safe to share between threads."""

    def __init__(self, *, k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self._indexes: dict[Path, _FileIndex] = {}
        self._lock = threading.Lock()

    def index(self, path: Path) -> _FileIndex:
        """The file's index, rebuilt when its mtime or size changed; raises KnowledgeError."""
        path = Path(path)
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            with self._lock:
                cached = self._indexes.get(path)
            if cached is not None and cached.stamp == stamp:
                return cached
            if stat.st_size > MAX_FILE_BYTES:
                raise KnowledgeError(f"knowledge file {path.name} is larger than {MAX_FILE_BYTES} bytes")
            built = self._build(path, path.read_bytes().decode("utf-8", errors="replace"), stamp)
        except KnowledgeError:
            raise
        except OSError as exc:
            reason = exc.strerror or exc
            raise KnowledgeError(f"knowledge file {path.name} could not be read ({reason})") from None
        with self._lock:
            self._indexes[path] = built
        return built

    @staticmethod
    def _build(path: Path, text: str, stamp: tuple[int, int]) -> _FileIndex:
        """Chunk the text and record term frequencies as postings (term -> [(passage, tf)])."""
        index = _FileIndex(stamp=stamp, passages=[], lengths=[])
        for number, (heading, body) in enumerate(chunk(text)):
            index.passages.append(Passage(path=path, heading=heading, text=body))
            terms = Counter(tokenize(f"{heading}\n{body}"))
            index.lengths.append(sum(terms.values()))
            for term, frequency in terms.items():
                index.postings.setdefault(term, []).append((number, frequency))
        return index

    def search(self, question: str, paths: Sequence[Path], limit: int = 8) -> list[Passage]:
        """The passages of ``paths`` best matching ``question``, best first (only those sharing a term)."""
        indexes = [self.index(path) for path in paths]
        terms = set(tokenize(question))
        total = sum(len(index.passages) for index in indexes)
        if not terms or not total:
            return []
        average = sum(sum(index.lengths) for index in indexes) / total or 1.0
        frequencies = {term: sum(len(index.postings.get(term, ())) for index in indexes) for term in terms}
        scored: list[tuple[float, int, int, Passage]] = []
        for file_number, index in enumerate(indexes):
            for number, score in self._scores(index, frequencies, total, average).items():
                scored.append((score, -file_number, -number, index.passages[number]))
        scored.sort(key=lambda item: item[:3], reverse=True)
        return [Passage(passage.path, passage.heading, passage.text, score)
                for score, _, _, passage in scored[:limit]]

    def _scores(self, index: _FileIndex, frequencies: dict[str, int], total: int,
                average: float) -> dict[int, float]:
        """BM25 score of every passage of one file that contains at least one query term."""
        scores: dict[int, float] = {}
        for term, document_frequency in frequencies.items():
            if not document_frequency:
                continue
            idf = math.log(1 + (total - document_frequency + 0.5) / (document_frequency + 0.5))
            for number, frequency in index.postings.get(term, ()):
                norm = self.k1 * (1 - self.b + self.b * index.lengths[number] / average)
                gain = idf * frequency * (self.k1 + 1) / (frequency + norm)
                scores[number] = scores.get(number, 0.0) + gain
        return scores
