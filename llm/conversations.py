"""Conversations: the turns of one dialogue, kept so follow-up prompts continue it.

Turns are stored as the model read them (with any fetched context or date line) so the next turn's prompt
is a byte-for-byte extension of the last one, which is what lets the engine reuse the cached tokens. What the
user typed is kept beside it for display. ``first_kept`` only moves forward: once old turns are trimmed they
stay out, so the prompt prefix stays stable from turn to turn.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from llm.errors import BadRequest, NotFound

MAX_ID_LENGTH = 128


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    content: str  # what the model read or wrote
    display: str | None = None  # what the user typed, when it differs
    sources: list[dict] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.display if self.display is not None else self.content,
                "sources": self.sources}


@dataclass
class Conversation:
    id: str
    personality: str
    turns: list[Turn] = field(default_factory=list)
    first_kept: int = 0  # turns before this index no longer reach the model
    summary: str = ""  # model-written summary of trimmed turns (personalities with history policy "summarize")
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def messages(self) -> list[dict[str, str]]:
        """The kept turns as chat messages."""
        return [{"role": turn.role, "content": turn.content} for turn in self.turns[self.first_kept:]]

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "personality": self.personality, "created": self.created, "updated": self.updated,
                "trimmed_turns": self.first_kept, "turns": [turn.public() for turn in self.turns]}


def check_id(conversation_id: str) -> str:
    """Client-chosen ids are free text within reason: printable, bounded."""
    if not isinstance(conversation_id, str) or not conversation_id.strip():
        raise BadRequest("A conversation id must be a non-empty string.")
    if len(conversation_id) > MAX_ID_LENGTH or not conversation_id.isprintable():
        raise BadRequest(f"A conversation id must be printable and at most {MAX_ID_LENGTH} characters.")
    return conversation_id.strip()


class MemoryConversationStore:
    """Conversations in memory, the least recently used dropped beyond ``capacity``."""

    def __init__(self, capacity: int = 10_000):
        self.capacity = capacity
        self._items: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, conversation_id: str | None, personality: str) -> Conversation:
        """The conversation with this id (created if new); a new random id when None."""
        conversation_id = check_id(conversation_id) if conversation_id is not None else uuid.uuid4().hex
        with self._lock:
            conversation = self._items.get(conversation_id)
            if conversation is None:
                conversation = Conversation(conversation_id, personality)
                self._items[conversation_id] = conversation
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            elif conversation.personality != personality:
                raise BadRequest(f"Conversation '{conversation_id}' belongs to personality "
                                 f"'{conversation.personality}', not '{personality}'.")
            self._items.move_to_end(conversation_id)
            return conversation

    def get(self, conversation_id: str) -> Conversation:
        with self._lock:
            conversation = self._items.get(conversation_id)
        if conversation is None:
            raise NotFound(f"Unknown conversation '{conversation_id}'.")
        return conversation

    def save(self, conversation: Conversation) -> None:
        """Record new turns (a no-op in memory; a database store writes them)."""
        conversation.updated = time.time()

    def delete(self, conversation_id: str) -> None:
        with self._lock:
            if self._items.pop(conversation_id, None) is None:
                raise NotFound(f"Unknown conversation '{conversation_id}'.")
