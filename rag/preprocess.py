"""Turn a user's prompt into a question plus context: a leading URL, |CONTEXT| blocks, feeds, knowledge.

The app calls ``Preprocessor.prepare`` once per user message and gets a ``Prepared``: the question with
the URL and markers removed, the context text (already within the token budget), the sources used, and
notices for the user (a refused or failed fetch, context that was shortened). Only a malformed |CONTEXT|
marker raises (``llm.errors.BadRequest``); fetch problems never do, the question is answered without them.

Context priority when the budget is tight: the user's |CONTEXT| text, then the page at the leading URL,
then triggered feeds (in the personality's order), then knowledge passages (best first).
"""

from __future__ import annotations

import logging
import pathlib
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm.errors import BadRequest
from rag.budget import CountTokens, Section, assemble, sentences
from rag.extract import Document, ExtractError, extract
from rag.fetch import FetchError, SafeFetcher
from rag.knowledge import KnowledgeBase, KnowledgeError
from rag.search import SearchError, Searx
from rag.text import mentions

LOG = logging.getLogger(__name__)
OPEN_MARKER = "|CONTEXT|"
CLOSE_MARKER = "|/CONTEXT|"
# The reference design's later page sends clipboard text as |CONTENT|...|/CONTENT|: the same thing.
ALIASES = {"|CONTENT|": OPEN_MARKER, "|/CONTENT|": CLOSE_MARKER}
# |RAG|domain|domain|/RAG| asks for a web search restricted to those domains (not configured yet).
_RAG_MARKER = re.compile(r"\A\s*\|RAG\|(?P<domains>.*?)\|/RAG\|", re.DOTALL)
DEFAULT_QUESTION = "Summarise this page."
# Any scheme://... at the very start counts as a URL, so "file:///etc/passwd ..." gets a clear refusal.
_LEADING_URL = re.compile(r"\A\s*(?P<url>[A-Za-z][A-Za-z0-9+.\-]*://\S+|file:\S+)")
_TRAILING_PUNCTUATION = ".,;:!?'\"”’»"
_BRACKETS = {")": "(", "]": "[", ">": "<", "}": "{"}


@dataclass
class Source:
    """Where context came from: a page or feed (with its URL), a knowledge file (url None, title = name), or a
    knowledge base passage (``number``: how the answer cites it; the url opens the document there)."""

    title: str
    url: str | None
    number: int | None = None


@dataclass(frozen=True)
class Plan:
    """What the model decided to look up before answering (``llm.conversation.grounding``): whether to retrieve,
    from which of the offered sources (``documents``, ``web``, ``feed:<n>``), and with which query."""

    retrieve: bool
    sources: frozenset[str] = frozenset()
    query: str = ""

    def uses(self, source: str) -> bool:
        return self.retrieve and source in self.sources


@dataclass
class Prepared:
    """The outcome of preprocessing one prompt.

    ``question``: the prompt without the URL and |CONTEXT| blocks ("Summarise this page." when only a URL
    was given). ``context``: text for the prompt's context slot, "" if none, already within the budget.
    ``sources``: what the context was drawn from. ``notices``: sentences for the user (fetch refused or
    failed, context shortened); each was also sent to ``on_status``.
    """

    question: str
    context: str = ""
    sources: list[Source] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def split_custom_context(prompt: str) -> tuple[str, list[str]]:
    """Remove |CONTEXT|...|/CONTEXT| (or |CONTENT|) blocks; returns the rest and the blocks; BadRequest if
    malformed."""
    for alias, marker in ALIASES.items():
        prompt = prompt.replace(alias, marker)
    rest: list[str] = []
    blocks: list[str] = []
    position = 0
    while (start := prompt.find(OPEN_MARKER, position)) != -1:
        end = prompt.find(CLOSE_MARKER, start + len(OPEN_MARKER))
        if end == -1:
            raise BadRequest(f"The prompt opens {OPEN_MARKER} but never closes it with {CLOSE_MARKER}.",
                             param="prompt")
        rest.append(prompt[position:start])
        blocks.append(prompt[start + len(OPEN_MARKER):end].strip())
        position = end + len(CLOSE_MARKER)
    rest.append(prompt[position:])
    remainder = " ".join(part.strip() for part in rest if part.strip())
    if CLOSE_MARKER in remainder:
        raise BadRequest(f"The prompt has {CLOSE_MARKER} without a {OPEN_MARKER} before it.", param="prompt")
    return remainder, [block for block in blocks if block]


def split_leading_url(text: str) -> tuple[str | None, str]:
    """The URL the text starts with (trailing punctuation left out) and the rest of the text after it."""
    match = _LEADING_URL.match(text)
    if not match:
        return None, text.strip()
    url = match.group("url")
    while url and (url[-1] in _TRAILING_PUNCTUATION
                   or (url[-1] in _BRACKETS and url.count(_BRACKETS[url[-1]]) < url.count(url[-1]))):
        url = url[:-1]
    return url, text[match.end("url"):].strip()  # punctuation cut from the URL's end goes too


class Preprocessor:
    """Prepares prompts for one app; holds the fetcher (and its page cache) and the knowledge indexes.

    ``fetcher`` defaults to a ``SafeFetcher`` built from ``settings`` whose cache runs on ``clock``.
    """

    def __init__(self, settings: Any, fetcher: SafeFetcher | None = None,
                 clock: Callable[[], float] = time.monotonic, library: Any = None):
        self.settings = settings
        self.fetcher = fetcher or SafeFetcher(settings, clock=clock)
        self.knowledge = KnowledgeBase()
        self.library = library  # knowledge bases (llm.knowledge.index.KnowledgeIndex), None: none
        self.searcher = (Searx(settings.search_url, settings.fetch_timeout, settings.search_results)
                         if settings.search_url else None)

    def prepare(self, prompt: str, *, count_tokens: CountTokens, feeds: Iterable[dict] = (),
                knowledge: Sequence[pathlib.Path] = (), on_status: Callable[[str], None] | None = None,
                budget_tokens: int | None = None, reader: str | None = None,
                shared_bases: Sequence[str] = (), plan: Plan | None = None) -> Prepared:
        """Question, context, sources and notices for ``prompt``; raises BadRequest only for bad markers.

        ``feeds`` are the personality's feed entries (url, title, keywords, match); ``knowledge`` its
        files; ``on_status`` receives progress ("Fetching https://...") and notices as they happen;
        ``budget_tokens`` defaults to the ``rag_length`` setting; ``reader`` is the user whose knowledge bases
        are searched, with the personality's ``shared_bases``; ``plan``, when the model decided what to look up,
        replaces the defaults (every knowledge base, feeds by their keywords, no web search unless asked for with
        ``|RAG|``) by its choice and its query. What the user asked for explicitly (a URL, ``|CONTEXT|``,
        ``|RAG|``) is always honoured.
        """
        run = _Run(on_status)
        search, domains = _RAG_MARKER.match(prompt), None
        if search is not None:
            prompt = prompt[search.end():]
            domains = [part.strip() for part in search["domains"].split("|") if part.strip()]
            if self.searcher is None:
                run.notice(f"Web search grounding ({', '.join(domains) or 'the web'}) is not configured on this "
                           "service, so this question is answered without a search.")
                domains = None
        text, custom = split_custom_context(prompt)
        url, asked = split_leading_url(text)
        question = DEFAULT_QUESTION if url is not None and not asked else asked
        feeds = list(feeds)
        budget = self.settings.rag_length if budget_tokens is None else budget_tokens
        if budget <= 0:  # RAG is off (LLM_RAG_LENGTH=0) or the prompt left no room: say so if it was asked for
            if custom or url:
                run.notice(f"No context was added: the context budget is {budget} tokens (LLM_RAG_LENGTH).")
            return Prepared(question=question, notices=run.notices)
        sections = [Section("Context given by the user:", sentences(block), label="Your |CONTEXT| text")
                    for block in custom]
        if url is not None:
            sections += self._page_sections(url, run)
        query = plan.query if plan is not None and plan.query else asked
        if plan is not None:  # the chosen feeds, whatever their keywords
            chosen = [feed for n, feed in enumerate(feeds, 1) if plan.uses(f"feed:{n}")]
            sections += self._feed_sections(asked, chosen, run, every=True)
        else:
            sections += self._feed_sections(asked, feeds, run)
        sections += self._knowledge_sections(asked, knowledge, run)
        if plan is None or plan.uses("documents"):
            sections += self._library_sections(query, reader, shared_bases, run)
        if domains is None and plan is not None and plan.uses("web") and self.searcher is not None:
            domains = []
        if domains is not None:
            sections += self._search_sections(query, domains, run)
        context, kept = assemble(sections, budget, count_tokens)
        if any(isinstance(s.payload, Source) and s.payload.number for s in kept):
            context += "\n\nWhen you use a numbered passage, cite its number in brackets, like [1]."
        for section in sections:
            if section.cut and section.label:
                run.notice(f"{section.label} was shortened to fit the context budget ({budget} tokens).")
        sources = _unique_sources(section.payload for section in kept)
        return Prepared(question=question, context=context, sources=sources, notices=run.notices)

    def _fetch_document(self, url: str, run: _Run) -> Document | None:
        """Fetch and read one URL, turning any failure into a notice."""
        run.status(f"Fetching {url}")
        try:
            return extract(self.fetcher.fetch(url))
        except FetchError as exc:
            run.notice(str(exc))
        except ExtractError as exc:
            run.notice(f"Could not read {url}: {exc}")
        except Exception:  # a bug must not cost the user their answer; it is logged with its traceback
            LOG.exception("unexpected error while fetching %s", url)
            run.notice(f"Could not fetch {url}: an unexpected error occurred")
        return None

    def _page_sections(self, url: str, run: _Run) -> list[Section]:
        """The page (or feed) at the prompt's leading URL."""
        document = self._fetch_document(url, run)
        if document is None:  # tell the model too, so it does not answer as if it had read the page
            return [Section("Note:", [f"The page {url} could not be read ({run.notices[-1]}). Say so; do not guess "
                                      "what it contains."])]
        return [_document_section(document, "Web page" if document.kind != "feed" else "Feed", url, None)]

    def sources(self, reader: str | None, shared_bases: Sequence[str], feeds: Sequence[dict]) -> dict[str, str]:
        """What a question could be grounded in beyond the prompt itself: name -> description, for the model to
        choose from (``llm.conversation.grounding``)."""
        offered: dict[str, str] = {}
        try:
            if self.library is not None and self.library.searchable(reader, shared_bases):
                offered["documents"] = "the user's documents and this assistant's reference documents"
        except Exception:  # reported when the search itself fails (_library_sections)
            LOG.exception("listing the knowledge bases failed")
        for n, feed in enumerate(feeds, 1):
            if isinstance(feed, dict) and isinstance(feed.get("url"), str):
                offered[f"feed:{n}"] = f"the news feed “{feed.get('title') or feed['url']}”"
        if self.searcher is not None:
            offered["web"] = "a web search"
        return offered

    def _feed_sections(self, question: str, feeds: Iterable[dict], run: _Run, every: bool = False) -> list[Section]:
        """The personality's feeds whose keywords the question mentions (``every``: all of them)."""
        sections: list[Section] = []
        for feed in feeds:
            if not isinstance(feed, dict) or not isinstance(feed.get("url"), str):
                continue
            keywords = [word for word in feed.get("keywords") or () if isinstance(word, str)]
            if not every and not mentions(question, keywords, match=str(feed.get("match") or "any")):
                continue
            document = self._fetch_document(feed["url"], run)
            if document is not None:
                sections.append(_document_section(document, "Feed", feed["url"], feed.get("title")))
        return sections

    def _knowledge_sections(self, question: str, paths: Sequence[pathlib.Path], run: _Run) -> list[Section]:
        """The best passages of the knowledge files, one section per passage (cut at passage boundaries)."""
        readable: list[pathlib.Path] = []
        for path in paths:
            try:
                self.knowledge.index(pathlib.Path(path))
                readable.append(pathlib.Path(path))
            except KnowledgeError as exc:
                run.notice(f"Could not use {exc}.")
        if not readable or not question.strip():
            return []
        # Passages are ranked: the budget simply stops admitting them, which is not worth a notice.
        return [Section(f"From {passage.file}:", sentences(passage.as_text()),
                        payload=Source(title=passage.file, url=None))
                for passage in self.knowledge.search(question, readable)]

    def _library_sections(self, question: str, reader: str | None, shared: Sequence[str], run: _Run) -> list[Section]:
        """The best passages of the reader's knowledge bases and the personality's, numbered for citation."""
        limit = self.settings.knowledge_passages
        if self.library is None or not limit or not question.strip():
            return []
        try:  # a store that cannot be read costs the answer its passages, never the answer
            bases = self.library.searchable(reader, shared)
            if bases:
                run.status("Searching the knowledge bases")
            hits = self.library.search(bases, question, limit) if bases else []
        except Exception:
            LOG.exception("searching the knowledge bases failed")
            run.notice("The knowledge bases could not be searched; this question is answered without them.")
            return []
        sections = []
        for number, hit in enumerate(hits, 1):
            page = hit.location.removeprefix("page ").split(" ")[0] if hit.location.startswith("page ") else ""
            url = f"/knowledge/bases/{hit.base_id}/documents/{hit.document_id}/file" + (f"#page={page}" if page else "")
            sections.append(Section(f"[{number}] From {hit.document} ({hit.location}):", sentences(hit.text),
                                    payload=Source(f"{hit.document}, {hit.location}", url, number)))
        return sections

    def _search_sections(self, question: str, domains: Sequence[str], run: _Run) -> list[Section]:
        """The first results of a web search (``|RAG|domain|...|/RAG|``), each page read through the safe fetcher
        (its search snippet when the page cannot be read)."""
        where = ", ".join(domains) or "the web"
        if not question.strip():
            return []
        run.status(f"Searching {where} for “{question[:200]}”")
        try:
            results = self.searcher.search(question[:500], domains)
        except SearchError as exc:
            run.notice(f"The web search failed: {exc}; this question is answered without it.")
            return []
        if not results:
            run.notice(f"The web search found nothing on {where}.")
            return []
        sections = []
        for result in results:
            document = self._fetch_document(result.url, run)
            if document is not None:
                sections.append(_document_section(document, "Search result", result.url, result.title))
            elif result.snippet:
                sections.append(Section(f"Search result “{result.title}” ({result.url}):", sentences(result.snippet),
                                        payload=Source(title=result.title, url=result.url)))
        return sections


class _Run:
    """Notices and status messages of one ``prepare`` call."""

    def __init__(self, on_status: Callable[[str], None] | None):
        self.on_status = on_status
        self.notices: list[str] = []

    def status(self, message: str) -> None:
        """Progress for the client as it happens (the callback's own errors propagate)."""
        if self.on_status is not None:
            self.on_status(message)

    def notice(self, message: str) -> None:
        """A problem worth telling the user: kept in the result and sent as a status."""
        self.notices.append(message)
        self.status(message)


def _document_section(document: Document, kind: str, url: str, title: str | None) -> Section:
    """A section for a fetched document: feeds cut at entries, pages at sentences."""
    address = document.url or url
    name = title or document.title or address
    header = f"{kind} “{name}” ({address}):"
    source = Source(title=name, url=address)
    if document.entries:
        return Section(header, [entry.as_text() for entry in document.entries], joiner="\n",
                       label=f"The feed {address}", payload=source)
    return Section(header, sentences(document.text), label=f"The page {address}", payload=source)


def _unique_sources(payloads: Iterable[object]) -> list[Source]:
    """Sources of the kept sections, each once, in order."""
    sources: list[Source] = []
    for payload in payloads:
        if isinstance(payload, Source) and payload not in sources:
            sources.append(payload)
    return sources
