"""Conversations: the turns of one dialogue, kept so follow-up prompts continue it.

Turns are stored as the model read them (with any fetched context or date line) so the next turn's prompt
is a byte-for-byte extension of the last one, which is what lets the engine reuse the cached tokens. What the
user typed is kept beside it for display. ``first_kept`` only moves forward: once old turns are trimmed they
stay out, so the prompt prefix stays stable from turn to turn.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from llm.errors import BadRequest

MAX_ID_LENGTH = 128
TITLE_LENGTH = 60
# Safe in URLs, headers and file names, and wide enough for the reference clients' "urn:uuid:..." keys.
ID_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:~-]{{0,{MAX_ID_LENGTH - 1}}}", re.ASCII)


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    content: str  # what the model read or wrote
    display: str | None = None  # what the user typed, when it differs
    sources: list[dict] = field(default_factory=list)
    message_id: int | None = None
    rating: int | None = None
    comment: str | None = None
    variants: list[int] = field(default_factory=list)  # ids of this turn and its siblings (edits, regenerations)

    def public(self) -> dict[str, Any]:
        return {"id": self.message_id, "role": self.role,
                "content": self.display if self.display is not None else self.content,
                "sources": self.sources, "rating": self.rating, "comment": self.comment,
                "variants": self.variants if len(self.variants) > 1 else []}


@dataclass
class Conversation:
    id: str  # the id its owner knows it by (chosen by the client, or random); unique per user only
    personality: str
    turns: list[Turn] = field(default_factory=list)
    first_kept: int = 0  # turns before this index no longer reach the model
    summary: str = ""  # model-written summary of trimmed turns (personalities with history policy "summarize")
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    user: str = "anonymous"
    title: str = ""
    key: str = ""  # the internal id: database row and engine cache key, never shared between users
    stored: bool = True  # False until its first turn is kept: refused prompts leave no rows behind
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def messages(self) -> list[dict[str, str]]:
        """The kept turns as chat messages."""
        return [{"role": turn.role, "content": turn.content} for turn in self.turns[self.first_kept:]]

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "personality": self.personality, "title": self.title, "created": self.created,
                "updated": self.updated, "trimmed_turns": self.first_kept,
                "turns": [turn.public() for turn in self.turns]}


def check_id(conversation_id: Any) -> str:
    """Client-chosen ids: letters, digits and ``._:~-``, at most 128 characters, so they travel unchanged in URLs,
    headers (``X-Conversation``) and file names."""
    if not isinstance(conversation_id, str) or not ID_PATTERN.fullmatch(conversation_id.strip()):
        raise BadRequest(f"A conversation id must be 1 to {MAX_ID_LENGTH} characters: letters, digits and . _ : ~ - "
                         "(starting with a letter or digit).", param="session")
    return conversation_id.strip()


def title_of(question: str) -> str:
    """A conversation's title: the question on one line, shortened (callers pass it without context blocks or
    URLs)."""
    text = " ".join(question.split())
    return text[:TITLE_LENGTH] + ("…" if len(text) > TITLE_LENGTH else "")
