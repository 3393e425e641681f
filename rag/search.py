"""Web search for grounding, through SearXNG: an existing, self-hostable metasearch engine with a JSON API.

``LLM_SEARCH_URL`` names the instance (its ``search.formats`` must include ``json``). A search asks
``GET <url>/search?q=...&format=json``; restricted to domains (``|RAG|canada.ca|gc.ca|/RAG|``), the query gains
``site:`` terms for the engines that honour them and the results are filtered here too, so no result from
another domain is ever read, whatever the engines did. The instance is the operator's (often on a private
network), so it is asked directly with a timeout and a size cap; the result *pages* are not: each is fetched by the
SSRF-safe fetcher like any URL in a prompt (private addresses refused, every redirect checked).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

from rag.addresses import domain_matches

LOG = logging.getLogger(__name__)
MAX_RESPONSE_BYTES = 2_000_000


class SearchError(Exception):
    """The search engine could not be asked or answered badly; the message says which."""


@dataclass(frozen=True)
class SearchResult:
    title: str
    url: str
    snippet: str


class Searx:
    """One SearXNG instance."""

    def __init__(self, base_url: str, timeout: float = 10.0, results: int = 3,
                 session_factory=requests.Session):
        self.base_url, self.timeout, self.results = base_url.rstrip("/"), timeout, results
        self._session_factory = session_factory

    def search(self, query: str, domains: Sequence[str] = ()) -> list[SearchResult]:
        """The first results for ``query`` (only from ``domains`` and their subdomains, when given)."""
        terms = " OR ".join(f"site:{domain}" for domain in domains)
        params = {"q": f"{query} ({terms})" if len(domains) > 1 else f"{query} {terms}".strip(), "format": "json"}
        try:
            with self._session_factory() as session, session.get(f"{self.base_url}/search", params=params,
                                                                 timeout=self.timeout, stream=True) as response:
                if response.status_code != 200:
                    raise SearchError(f"the search engine answered HTTP {response.status_code}")
                body = response.raw.read(MAX_RESPONSE_BYTES + 1, decode_content=True)
        except requests.RequestException as error:
            raise SearchError(f"the search engine could not be reached ({type(error).__name__})") from None
        if len(body) > MAX_RESPONSE_BYTES:
            raise SearchError("the search engine's answer was too large")
        try:
            items = requests.models.complexjson.loads(body)["results"]
        except (ValueError, KeyError, TypeError):
            raise SearchError("the search engine did not answer in JSON (is its json format enabled?)") from None
        found: list[SearchResult] = []
        for item in items if isinstance(items, list) else []:
            url = item.get("url") if isinstance(item, dict) else None
            if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
                continue
            if domains and not domain_matches(urlsplit(url).hostname or "", domains):
                continue
            if url not in (result.url for result in found):
                found.append(SearchResult(str(item.get("title") or url), url, str(item.get("content") or "")))
            if len(found) == self.results:
                break
        return found
