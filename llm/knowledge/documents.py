"""Uploaded documents to located passages, and what is refused on the way.

Readers, each a maintained library made for its format: PDF through ``pypdf`` (pure Python, no external
program is ever run; it bounds how far a compressed stream may inflate), DOCX through ``python-docx`` (paragraph
styles give the headings), HTML through BeautifulSoup (already the RAG's reader), Markdown and plain text as
UTF-8. The kind is taken from the bytes first (``%PDF-``, a ZIP holding ``word/document.xml``, markup), the
file name second, so a mislabelled file is read for what it is and an unknown binary is refused.

Passages follow the document's structure: PDF pages are chunked page by page (a passage's location is its
page), other documents section by section (the location is the heading path, "Install > Linux"). Within a
section, passages of about 100-200 words are cut at paragraphs and sentences (``rag.knowledge.chunk``), and
each passage after the first starts with the last sentence of the one before (the overlap that keeps an
answer split across a boundary findable from either side).
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass

from bs4 import BeautifulSoup

from llm.errors import BadRequest, FileTooLarge, ServiceError, UnsupportedType
from rag.budget import sentences
from rag.knowledge import chunk

KINDS = ("pdf", "docx", "html", "markdown", "text")
MAX_DOCX_INFLATED = 100_000_000  # bytes a DOCX may unpack to
MAX_DOCX_RATIO = 200  # a member that inflates more than this is a bomb, not a document
OVERLAP_WORDS = 40  # at most this much of the previous passage opens the next
_HEADING_STYLE = re.compile(r"heading (\d)", re.IGNORECASE)


@dataclass(frozen=True)
class Passage:
    """A piece of a document: where it is (``page`` for PDFs, else the heading path) and its text."""

    location: str
    text: str


@dataclass(frozen=True)
class Limits:
    """What one document may cost: its size, its pages and the passages it yields."""

    max_bytes: int = 20_000_000
    max_pages: int = 2000
    max_passages: int = 20_000


def kind_of(name: str, data: bytes) -> str:
    """The document's kind, from its bytes first and its name second; 415 for anything else."""
    lower = name.lower()
    if data.startswith(b"%PDF-"):
        return "pdf"
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                if "word/document.xml" in archive.namelist():
                    return "docx"
        except zipfile.BadZipFile:
            raise BadRequest(f"{name} looks like a ZIP archive but cannot be opened.", param="file") from None
        raise UnsupportedType(f"{name} is an archive but not a Word document (DOCX).")
    if b"\x00" in data[:8192]:
        raise UnsupportedType(f"{name} is neither PDF, DOCX, HTML, Markdown nor text.")
    head = data[:1024].lstrip().lower()
    if lower.endswith((".html", ".htm")) or head.startswith((b"<!doctype html", b"<html")):
        return "html"
    if lower.endswith((".md", ".markdown")):
        return "markdown"
    if lower.endswith((".txt", ".text", ".rst", ".csv", ".log")) or "." not in lower.rsplit("/", 1)[-1]:
        return "text"
    raise UnsupportedType(f"{name}: only PDF, DOCX, HTML, Markdown and text files can be added.")


def read(name: str, data: bytes, limits: Limits = Limits()) -> tuple[str, list[Passage], int]:
    """(kind, passages, pages) of an upload; 400 for a malformed file, 413 for one too large, 415 for one of
    another kind."""
    if len(data) > limits.max_bytes:
        raise FileTooLarge(f"{name} is {len(data)} bytes; the limit is {limits.max_bytes}.")
    if not data.strip():
        raise BadRequest(f"{name} is empty.", param="file")
    kind = kind_of(name, data)
    if kind == "pdf":
        pages = _pdf_pages(name, data, limits)
        passages = [passage for number, text in enumerate(pages, 1)
                    for passage in _passages(text, f"page {number}", markdown=False)]
        count = len(pages)
    else:
        text = {"docx": _docx_text, "html": _html_text}.get(kind, _utf8)(name, data)
        passages = _passages(text, "", markdown=True)
        count = 0
    if not passages:
        raise BadRequest(f"{name} has no text to read (a scanned PDF needs OCR first).", param="file")
    if len(passages) > limits.max_passages:
        raise FileTooLarge(f"{name} yields {len(passages)} passages; the limit is {limits.max_passages}.")
    return kind, passages, count


def _passages(text: str, where: str, markdown: bool) -> list[Passage]:
    """Structure-bound passages of one page or document, each (but a section's first) opening with the last
    sentence of the one before it."""
    result: list[Passage] = []
    previous_heading, previous_text = None, ""
    for heading, body in chunk(text if markdown else re.sub(r"(?m)^#", " #", text)):  # a page's '#' is no heading
        location = " > ".join(filter(None, [where, heading])) or "start"
        if heading == previous_heading and previous_text:
            tail = list(sentences(previous_text))[-1].strip()
            if 0 < len(tail.split()) <= OVERLAP_WORDS:
                body = f"{tail} {body}"
        result.append(Passage(location, body))
        previous_heading, previous_text = heading, body
    return result


def _utf8(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # every byte is a character: old text files still read


def _html_text(name: str, data: bytes) -> str:
    """Visible text with headings kept as Markdown headings, so passages follow the page's sections."""
    soup = BeautifulSoup(data, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "nav", "svg"]):
        tag.decompose()
    for level in range(1, 7):
        for heading in soup.find_all(f"h{level}"):
            heading.replace_with(f"\n\n{'#' * level} {' '.join(heading.get_text(' ').split())}\n\n")
    for block in soup.find_all(["p", "li", "tr", "div", "br", "pre", "blockquote"]):
        block.insert_after("\n\n")
    return "\n".join(line.strip() for line in soup.get_text().splitlines())


def _docx_text(name: str, data: bytes) -> str:
    """Paragraphs in order, "Heading N" styles as Markdown headings, tables a row per line; the archive is
    measured before it is opened (a DOCX is a ZIP: a small file may inflate to gigabytes)."""
    import docx

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = archive.infolist()
        total = sum(member.file_size for member in members)
        bomb = any(member.file_size > MAX_DOCX_RATIO * max(member.compress_size, 1) and member.file_size > 1_000_000
                   for member in members)
        if total > MAX_DOCX_INFLATED or bomb:
            raise FileTooLarge(f"{name} would unpack to {total} bytes; refused as an archive bomb.")
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 - python-docx raises lxml's, zipfile's and its own errors
        raise BadRequest(f"{name} is not a readable Word document ({type(error).__name__}).", param="file") from None
    lines = []
    for paragraph in document.paragraphs:
        text = paragraph.text.strip()
        style = _HEADING_STYLE.fullmatch(paragraph.style.name or "") if paragraph.style is not None else None
        if text:
            lines.append(f"{'#' * int(style[1])} {text}" if style else text)
    for table in document.tables:
        lines += [" | ".join(cell.text.strip() for cell in row.cells) for row in table.rows]
    return "\n\n".join(lines)


def _pdf_pages(name: str, data: bytes, limits: Limits) -> list[str]:
    """Each page's text; encrypted, malformed or over-long PDFs refused."""
    from pypdf import PdfReader
    from pypdf.errors import LimitReachedError, PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise BadRequest(f"{name} is encrypted; upload it without a password.", param="file")
        if len(reader.pages) > limits.max_pages:
            raise FileTooLarge(f"{name} has {len(reader.pages)} pages; the limit is {limits.max_pages}.")
        return [(page.extract_text() or "").strip() for page in reader.pages]
    except ServiceError:
        raise
    except LimitReachedError:
        raise FileTooLarge(f"{name} holds a stream that inflates past pypdf's limits; refused as a PDF bomb.") from None
    except (PyPdfError, ValueError, KeyError, TypeError, RecursionError, OSError) as error:
        raise BadRequest(f"{name} is not a readable PDF ({type(error).__name__}: {error}).", param="file") from None
