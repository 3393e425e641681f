"""Retrieval for prompts: safe URL fetching, HTML/feed extraction, |CONTEXT| blocks, feeds, knowledge files.

The app uses ``Preprocessor`` (see ``rag.preprocess``); the other modules are its parts.
"""

from rag.extract import Document, Entry, ExtractError, extract
from rag.fetch import Fetched, FetchError, FetchFailed, FetchRefused, SafeFetcher
from rag.knowledge import KnowledgeBase, Passage
from rag.preprocess import DEFAULT_QUESTION, Prepared, Preprocessor, Source

__all__ = ["DEFAULT_QUESTION", "Document", "Entry", "ExtractError", "FetchError", "FetchFailed",
           "FetchRefused", "Fetched", "KnowledgeBase", "Passage", "Prepared", "Preprocessor", "SafeFetcher",
           "Source", "extract"]
