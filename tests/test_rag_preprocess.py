"""Preprocessing prompts: URLs, |CONTEXT| blocks, keyword feeds, knowledge files, budgets, notices."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llm.errors import BadRequest, ServiceError
from rag.fetch import SafeFetcher
from rag.preprocess import (
    DEFAULT_QUESTION,
    Plan,
    Prepared,
    Preprocessor,
    Source,
    split_custom_context,
    split_leading_url,
)
from tests.rag_support import (
    FIXTURES,
    FakeResponse,
    FakeSessions,
    FixtureHTTPServer,
    StaticResolver,
    fixture_server,
    rag_settings,
)


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def server() -> Iterator[FixtureHTTPServer]:
    with fixture_server() as running:
        yield running


@pytest.fixture()
def pre() -> Preprocessor:
    return Preprocessor(rag_settings())


@pytest.mark.parametrize(("prompt", "rest", "blocks"), [
    ("|CONTEXT|Paris is in France.|/CONTEXT| Where is Paris?", "Where is Paris?", ["Paris is in France."]),
    ("Where? |CONTEXT| a |/CONTEXT| and |CONTEXT|b|/CONTEXT| now", "Where? and now", ["a", "b"]),
    ("|CONTEXT||/CONTEXT|hi", "hi", []),
    ("|CONTEXT|only context|/CONTEXT|", "", ["only context"]),
    ("no markers | at all", "no markers | at all", []),
    ("|context| lower case is text", "|context| lower case is text", []),
])
def test_custom_context_blocks(prompt: str, rest: str, blocks: list[str]) -> None:
    assert split_custom_context(prompt) == (rest, blocks)


@pytest.mark.parametrize(("prompt", "message"), [
    ("|CONTEXT| never closed. What now?", "never closes it with |/CONTEXT|"),
    ("|CONTEXT|a|/CONTEXT| then |CONTEXT| b", "never closes"),
    ("stray |/CONTEXT| here", "without a |CONTEXT| before it"),
])
def test_malformed_markers_are_bad_requests(pre: Preprocessor, prompt: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as caught:
        pre.prepare(prompt, count_tokens=words)
    assert isinstance(caught.value, ServiceError) and caught.value.status == 400


@pytest.mark.parametrize(("text", "url", "rest"), [
    ("https://example.org/page What does this say?", "https://example.org/page", "What does this say?"),
    ("  https://example.org/page", "https://example.org/page", ""),
    ("https://example.org/page, what is it?", "https://example.org/page", "what is it?"),
    ("https://example.org/page.", "https://example.org/page", ""),
    ("https://en.wikipedia.org/wiki/Foo_(bar) explain", "https://en.wikipedia.org/wiki/Foo_(bar)", "explain"),
    ("(https://example.org/x) hi", None, "(https://example.org/x) hi"),
    ("Read https://example.org/page please", None, "Read https://example.org/page please"),
    ("file:///etc/passwd show it", "file:///etc/passwd", "show it"),
])
def test_leading_url(text: str, url: str | None, rest: str) -> None:
    assert split_leading_url(text) == (url, rest)


def test_url_page_becomes_context(pre: Preprocessor, server: FixtureHTTPServer) -> None:
    url = server.url("/fixtures/main.html")
    statuses: list[str] = []
    prepared = pre.prepare(f"{url} What is the largest plant?", count_tokens=words, on_status=statuses.append)
    assert prepared.question == "What is the largest plant?"
    assert "Sihwa Lake" in prepared.context and "Most read" not in prepared.context
    assert prepared.context.startswith(f"Web page “Tidal Energy Explained | Example News” ({url}):")
    assert prepared.sources == [Source(title="Tidal Energy Explained | Example News", url=url)]
    assert prepared.notices == []
    assert statuses == [f"Fetching {url}"]


def test_url_alone_gets_a_default_question(pre: Preprocessor, server: FixtureHTTPServer) -> None:
    prepared = pre.prepare(server.url("/fixtures/rss.xml"), count_tokens=words)
    assert prepared.question == DEFAULT_QUESTION
    assert "Storm warning for the coast (2024-05-14)" in prepared.context
    assert prepared.sources[0].title == "Weather Service Bulletins"


@pytest.mark.parametrize(("path", "notice"), [
    ("/redirect?to=" + quote("http://169.254.169.254/latest/", safe=""),
     "address 169.254.169.254 is a cloud metadata address"),
    ("/status/500", "the server answered HTTP 500"),
    ("/fixtures/malformed.xml", "Could not read"),
    ("/binary", "content type image/png is not a page, feed or text"),
])
def test_fetch_problems_become_notices(pre: Preprocessor, server: FixtureHTTPServer, path: str,
                                       notice: str) -> None:
    statuses: list[str] = []
    prepared = pre.prepare(f"{server.url(path)} summarise", count_tokens=words, on_status=statuses.append)
    assert prepared.question == "summarise"
    assert prepared.sources == []
    assert len(prepared.notices) == 1 and notice in prepared.notices[0]
    assert statuses[-1] == prepared.notices[0]
    # The model is told the page could not be read (and why), so it does not answer as if it had read it.
    assert prepared.context.startswith("Note:") and "could not be read" in prepared.context


def test_refused_scheme_is_a_notice(pre: Preprocessor) -> None:
    prepared = pre.prepare("file:///etc/passwd what is in it", count_tokens=words)
    assert prepared.notices == ["Could not fetch file:///etc/passwd: only http and https URLs are fetched, "
                                "not file:"]


def test_private_name_is_a_notice_and_the_question_survives() -> None:
    fetcher = SafeFetcher(rag_settings(), resolver=StaticResolver({"intranet.corp": ["10.0.0.7"]}))
    prepared = Preprocessor(rag_settings(), fetcher=fetcher).prepare("http://intranet.corp/ hi", count_tokens=words)
    assert prepared.notices == ["Could not fetch http://intranet.corp/: address 10.0.0.7 (from intranet.corp) "
                                "is private"]
    assert prepared.question == "hi"


def test_page_is_cut_at_a_sentence_boundary(server: FixtureHTTPServer) -> None:
    pre = Preprocessor(rag_settings())
    url = server.url("/fixtures/main.html")
    prepared = pre.prepare(url, count_tokens=words, budget_tokens=40)
    assert words(prepared.context) <= 40
    assert prepared.context.endswith("\nTidal power converts the energy of the tides into electricity.")
    assert prepared.notices == [f"The page {url} was shortened to fit the context budget (40 tokens)."]


def test_feed_is_cut_at_an_entry_boundary(pre: Preprocessor, server: FixtureHTTPServer) -> None:
    prepared = pre.prepare(server.url("/fixtures/rss.xml"), count_tokens=words, budget_tokens=45)
    lines = prepared.context.splitlines()
    assert words(prepared.context) <= 45
    assert lines[-1] == "  https://weather.example/bulletins/2"
    assert "Pollen" not in prepared.context


def test_custom_context_first_then_cut(pre: Preprocessor) -> None:
    prompt = "|CONTEXT|One two three. Four five six. Seven eight nine.|/CONTEXT| Count?"
    prepared = pre.prepare(prompt, count_tokens=words, budget_tokens=8)
    assert prepared.context == "Context given by the user:\nOne two three."
    assert prepared.question == "Count?"
    assert prepared.notices == ["Your |CONTEXT| text was shortened to fit the context budget (8 tokens)."]


FEEDS = [
    {"url": "/fixtures/rss.xml", "title": "Weather", "keywords": ["météo", "weather"], "match": "any"},
    {"url": "/fixtures/atom.xml", "keywords": ["release", "project"], "match": "all"},
]


def _feeds(server: FixtureHTTPServer) -> list[dict]:
    return [{**feed, "url": server.url(feed["url"])} for feed in FEEDS]


@pytest.mark.parametrize(("question", "titles"), [
    ("Quelle est la MÉTÉO demain ?", ["Weather"]),
    ("What's the weather like?", ["Weather"]),
    ("weathering the storm", []),
    ("Any new release of the project?", ["Project Changelog"]),
    ("Any new release?", []),
    ("weather and the project release", ["Weather", "Project Changelog"]),
])
def test_keyword_feeds(pre: Preprocessor, server: FixtureHTTPServer, question: str, titles: list[str]) -> None:
    before = server.hits["/fixtures/rss.xml"] + server.hits["/fixtures/atom.xml"]
    prepared = pre.prepare(question, count_tokens=words, feeds=_feeds(server))
    assert [source.title for source in prepared.sources] == titles
    assert server.hits["/fixtures/rss.xml"] + server.hits["/fixtures/atom.xml"] == before + len(titles)
    assert prepared.question == question


def test_knowledge_passages_join_the_context(pre: Preprocessor) -> None:
    knowledge = [FIXTURES / "guide.md", FIXTURES / "recettes.md", FIXTURES / "missing.md"]
    prepared = pre.prepare("How should I clean the widget?", count_tokens=words, knowledge=knowledge,
                           budget_tokens=60)
    assert prepared.context.startswith("From guide.md:\nWidget guide > Cleaning\nWipe the widget")
    assert words(prepared.context) <= 60
    assert prepared.sources == [Source(title="guide.md", url=None)]
    assert prepared.notices == ["Could not use knowledge file missing.md could not be read "
                                "(No such file or directory)."]


def test_zero_budget_adds_nothing(server: FixtureHTTPServer) -> None:
    pre = Preprocessor(rag_settings(LLM_RAG_LENGTH=0))
    before = server.hits["/fixtures/main.html"]
    prepared = pre.prepare(server.url("/fixtures/main.html") + " hi", count_tokens=words)
    assert (prepared.question, prepared.context) == ("hi", "")
    assert server.hits["/fixtures/main.html"] == before
    assert prepared.notices == ["No context was added: the context budget is 0 tokens (LLM_RAG_LENGTH)."]


def test_conversation_does_not_refetch(server: FixtureHTTPServer) -> None:
    now = [0.0]
    pre = Preprocessor(rag_settings(LLM_FETCH_CACHE_SECONDS=300), clock=lambda: now[0])
    url = server.url("/fixtures/article.html")
    before = server.hits["/fixtures/article.html"]
    first = pre.prepare(url + " first question", count_tokens=words)
    now[0] = 200
    second = pre.prepare(url + " follow-up", count_tokens=words)
    assert first.context == second.context and "sourdough" in first.context
    assert server.hits["/fixtures/article.html"] == before + 1
    now[0] = 301
    pre.prepare(url + " much later", count_tokens=words)
    assert server.hits["/fixtures/article.html"] == before + 2


# --- Property: arbitrary prompts never raise (except BadRequest) and never reach forbidden addresses. ---

PUBLIC = {"93.184.216.34", "2606:4700::1111"}
RESOLVER_TABLE = {
    "public.example": ["93.184.216.34"], "v6.example": ["2606:4700::1111"],
    "mixed.example": ["93.184.216.34", "10.0.0.5"], "private.example": ["192.168.1.1"],
    "meta.example": ["169.254.169.254"], "mapped.example": ["::ffff:127.0.0.1"], "localhost": ["127.0.0.1"],
}
HOSTS = list(RESOLVER_TABLE) + [
    "unknown.example", "93.184.216.34", "[2606:4700::1111]", "127.0.0.1", "2130706433", "0x7f.1", "[::1]",
    "[::ffff:10.0.0.1]", "169.254.169.254", "10.1", "evil@public.example", "public.example@127.0.0.1",
    "[fd00:ec2::254]", "100.100.100.200", "0", "[::]",
]
PUBLIC_HOSTS = ["public.example", "v6.example", "93.184.216.34", "[2606:4700::1111]"]
URLS = st.builds(lambda scheme, host, port, path: f"{scheme}://{host}{port}/{path}",
                 st.sampled_from(["http", "https"]) | st.sampled_from(["HTTP", "ftp", "file", "gopher"]),
                 st.sampled_from(PUBLIC_HOSTS) | st.sampled_from(HOSTS),
                 st.sampled_from(["", ":80", ":8080", ":0", ":99999"]),
                 st.text(alphabet="abc/?#%@.:=", max_size=8))
PIECES = st.one_of(st.text(max_size=20), URLS, st.sampled_from(["|CONTEXT|", "|/CONTEXT|", " ", "\n", "weather",
                                                                "news"]))
LEADING_URL_PROMPTS = st.tuples(URLS, st.lists(PIECES, max_size=3).map("".join)).map(" ".join)
PROMPTS = st.one_of(st.lists(PIECES, max_size=6).map("".join), LEADING_URL_PROMPTS, LEADING_URL_PROMPTS)


def _canned(redirects: list[str], script: list[int]) -> FakeSessions:
    """Responses in the order ``script`` picks them: pages, feeds, errors, binaries, redirects anywhere."""
    hops = itertools.count()
    rss = (FIXTURES / "rss.xml").read_bytes()
    page = (FIXTURES / "main.html").read_bytes()
    options = [
        lambda url: FakeResponse(200, {"Content-Type": "text/html"}, page),
        lambda url: FakeResponse(200, {"Content-Type": "text/html"}, rss),
        lambda url: FakeResponse(200, {}, b"plain words. more words."),
        lambda url: FakeResponse(500, {"Content-Type": "text/html"}, b"oops"),
        lambda url: FakeResponse(200, {"Content-Type": "image/png"}, b"\x89PNG"),
        lambda url: FakeResponse(200, {"Content-Type": "text/plain", "Content-Length": "999999999"}, b""),
        lambda url: FakeResponse(302, {"Location": redirects[next(hops) % len(redirects)]}),
        lambda url: FakeResponse(301, {}),
    ]
    calls = itertools.count()
    return FakeSessions(lambda url: options[script[next(calls) % len(script)] % len(options)](url))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=PROMPTS, redirects=st.lists(URLS, min_size=1, max_size=3),
       script=st.lists(st.integers(0, 7), min_size=1, max_size=4), budget=st.integers(0, 80))
def test_prepare_never_raises_and_never_dials_forbidden_addresses(prompt: str, redirects: list[str],
                                                                   script: list[int], budget: int) -> None:
    sessions = _canned(redirects, script)
    settings_ = rag_settings(LLM_UNSAFE_FETCH_ALLOW_LOOPBACK_FOR_TESTS=False)
    fetcher = SafeFetcher(settings_, session_factory=sessions, resolver=StaticResolver(dict(RESOLVER_TABLE)))
    feeds = [{"url": "http://public.example/feed", "keywords": ["weather"]},
             {"url": "http://mixed.example/feed", "keywords": ["news", "weather"], "match": "all"},
             {"url": "http://2130706433/feed", "keywords": ["news"]}]
    try:
        prepared = Preprocessor(settings_, fetcher=fetcher).prepare(
            prompt, count_tokens=words, feeds=feeds, knowledge=[FIXTURES / "guide.md"], budget_tokens=budget)
    except BadRequest:
        event("BadRequest")
        return
    event("requests made" if sessions.requests else "no request made")
    event("context added" if prepared.context else "no context")
    assert isinstance(prepared, Prepared)
    assert words(prepared.context) <= max(budget, 0)
    for _url, dialled in sessions.requests:
        assert set(dialled) <= PUBLIC


def test_rag_marker_searches_searxng_within_the_domains(server: FixtureHTTPServer) -> None:
    """|RAG|domain|/RAG| asks the SearXNG instance, keeps only results on those domains, reads each page through
    the safe fetcher and falls back to the snippet of one that cannot be read."""
    settings = rag_settings(LLM_SEARCH_URL=server.url(""))
    fetcher = SafeFetcher(settings, resolver=StaticResolver({"docs.example.org": ["127.0.0.1"],
                                                             "elsewhere.example.net": ["127.0.0.1"]}))
    statuses: list[str] = []
    off_domain = server.hits["/fixtures/main.html"]
    prepared = Preprocessor(settings, fetcher=fetcher).prepare(
        "|RAG|example.org|/RAG|How do I keep a sourdough starter?", count_tokens=words, on_status=statuses.append)
    assert prepared.question == "How do I keep a sourdough starter?"
    assert "Feed the starter once a day" in prepared.context  # the page itself, not only its snippet
    assert "Starters like rye flour." in prepared.context  # the unreadable page's snippet
    assert [source.title for source in prepared.sources] == ["Sourdough notes", "Broken page"]
    assert statuses[0] == "Searching example.org for “How do I keep a sourdough starter?”"
    assert server.hits["/fixtures/main.html"] == off_domain  # the off-domain result is never fetched


def test_a_failing_search_engine_is_a_notice() -> None:
    from bench._servers import free_port

    prepared = Preprocessor(rag_settings(LLM_SEARCH_URL=f"http://127.0.0.1:{free_port()}")).prepare(
        "|RAG|example.org|/RAG|Anything?", count_tokens=words)
    assert prepared.context == "" and prepared.question == "Anything?"
    assert prepared.notices == ["The web search failed: the search engine could not be reached (ConnectionError); "
                                "this question is answered without it."]


@pytest.mark.parametrize(("plan", "titles"), [
    (Plan(True, frozenset({"feed:2"}), "changes"), ["Project Changelog"]),  # chosen, though no keyword matched
    (Plan(False, frozenset({"feed:1"}), "x"), []),  # no retrieval: even a matching keyword fetches nothing
    (Plan(True, frozenset({"web"}), "sourdough starter care"), ["Sourdough notes", "Broken page"]),
])
def test_a_plan_replaces_the_defaults(server: FixtureHTTPServer, plan: Plan, titles: list[str]) -> None:
    settings = rag_settings(LLM_SEARCH_URL=server.url(""))
    fetcher = SafeFetcher(settings, resolver=StaticResolver({"docs.example.org": ["127.0.0.1"]}))
    pre = Preprocessor(settings, fetcher=fetcher)
    assert set(pre.sources(None, (), _feeds(server))) == {"feed:1", "feed:2", "web"}
    statuses: list[str] = []
    prepared = pre.prepare("What's the weather like?", count_tokens=words, feeds=_feeds(server), plan=plan,
                           on_status=statuses.append)
    assert [source.title for source in prepared.sources] == titles
    if plan.uses("web"):  # the model's query, over the whole web
        assert "Searching the web for “sourdough starter care”" in statuses
