"""Resumable answers: a websocket answer in JSON mode outlives its socket for a while, so a client whose
connection dropped (a phone locked, Wi-Fi switched, a tab slept) reconnects and picks up where it left off.

Every frame of a JSON-mode answer carries the answer's id and a sequence number (``start`` is 1) and is kept in
the answer's buffer. When the socket drops mid-answer the answer is *detached*: generation goes on (one answer's
worth of tokens, bounded by its ``max_tokens``) into the buffer. A client that opens
``/gpt-socket/<p>?format=json&resume=<answer>&after=<seq>`` gets every frame after ``seq`` and then the rest live,
with no second generation and nothing repeated or lost. An answer no client comes back for within
``LLM_RESUME_SECONDS`` is cancelled; a finished one is kept that long after it ended. The buffer is bounded
(``MAX_BUFFER_BYTES``; past it a detached answer is cancelled), an owner may leave at most
``MAX_DETACHED_PER_OWNER`` answers running without a socket (more are cancelled at once, as before this existed),
and only the owner that started an answer may resume it (its id is an unguessable capability as well).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

MAX_BUFFER_BYTES = 1 << 20  # ~20,000 tokens of frames: far beyond any max_tokens a personality allows
MAX_DETACHED_PER_OWNER = 2  # a phone that dropped mid-answer needs one; opening and dropping sockets buys no more
MAX_KEPT = 4096  # answers remembered at once (finished ones are forgotten oldest first past this)

Sink = Callable[[str], None]


class Answer:
    """One answer's frames, numbered, and the socket (``sink``) they go to while one is attached."""

    def __init__(self, ident: str, owner: str, conversation: str | None, sink: Sink, clock: Callable[[], float]):
        self.id, self.owner, self.conversation = ident, owner, conversation
        self.frames: list[str] = []
        self.size = 0
        self.done = False
        self.sink: Sink | None = sink
        self.since = clock()  # when it was detached, or when it ended (for expiry)
        self.turn: Any = None  # the ActiveTurn, once generation started (what cancel stops)
        self.cancelled = False
        self._clock = clock
        self._changed = threading.Condition()  # state; never held while sending
        self._sending = threading.Lock()  # frames go out one at a time, in order

    def emit(self, fields: dict[str, Any]) -> None:
        """Number a frame, keep it, and send it to the attached socket (a failing socket detaches itself)."""
        with self._sending:
            with self._changed:
                text = json.dumps({**fields, "answer": self.id, "seq": len(self.frames) + 1})
                self.frames.append(text)
                self.size += len(text)
                sink = self.sink
            if sink is not None:
                self._send(sink, [text])
            with self._changed:
                if fields.get("type") == "end":  # kept a while for a client that lost the last frames in flight
                    self.done, self.sink, self.since = True, None, self._clock()
                overflow = self.sink is None and self.size > MAX_BUFFER_BYTES and not self.done
                self._changed.notify_all()
        if overflow:
            self.cancel()

    def attach(self, sink: Sink, after: int) -> None:
        """A (new) socket takes the answer over: the frames after ``after`` first, then the rest as they come."""
        with self._sending:
            with self._changed:
                self.sink = sink
                backlog = self.frames[max(after, 0):]
            self._send(sink, backlog)
            with self._changed:
                self._changed.notify_all()

    def _send(self, sink: Sink, texts: list[str]) -> None:
        """Send in order (the caller holds ``_sending``, never ``_changed``: a send waits on the event loop, which
        must stay free to take ``_changed`` when a socket closes)."""
        try:
            for text in texts:
                sink(text)
        except Exception:  # noqa: BLE001 - the client went away; the frames wait in the buffer
            with self._changed:
                if self.sink is sink:
                    self.sink, self.since = None, self._clock()

    def wait(self, sink: Sink) -> None:
        """Until the answer has ended, or another socket took it over, or this one dropped."""
        with self._changed:
            while not self.done and self.sink is sink:
                self._changed.wait(timeout=1.0)

    def detach(self, sink: Sink) -> bool:
        """``sink``'s socket closed: True when the answer goes on without it (it had it, or nobody has it since
        a send failed, and it has not ended)."""
        with self._changed:
            if self.sink is not sink and self.sink is not None:
                return False
            self.sink, self.since = None, self._clock()
            self._changed.notify_all()
            return not self.done

    def cancel(self) -> None:
        """Stop the generation (now, or as soon as it starts)."""
        self.cancelled = True
        if self.turn is not None:
            self.turn.cancel()


class Answers:
    """The answers that may still be resumed, with their expiry (``LLM_RESUME_SECONDS``; 0 turns resuming off)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self._answers: OrderedDict[str, Answer] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def start(self, owner: str, conversation: str | None, sink: Sink) -> Answer:
        """A new answer, attached to the socket that asked for it."""
        answer = Answer(secrets.token_urlsafe(16), owner, conversation, sink, self.clock)
        with self._lock:
            self._sweep()
            self._answers[answer.id] = answer
        return answer

    def claim(self, ident: str, owner: str) -> Answer | None:
        """The answer to resume, if it is still kept and belongs to ``owner``."""
        with self._lock:
            self._sweep()
            answer = self._answers.get(ident)
        return answer if answer is not None and secrets.compare_digest(answer.owner, owner) else None

    def detach(self, answer: Answer, sink: Sink) -> None:
        """The answer's socket closed: it runs on for a client to come back to, or is cancelled when its owner
        already has as many detached answers as allowed (or resuming is off)."""
        if not answer.detach(sink):
            return
        with self._lock:
            running = sum(1 for other in self._answers.values()
                          if other.owner == answer.owner and other.sink is None and not other.done)
        if not self.enabled or running > MAX_DETACHED_PER_OWNER:
            answer.cancel()
            return
        timer = threading.Timer(self.seconds, self._expire, args=(answer,))
        timer.daemon = True
        timer.start()

    def _expire(self, answer: Answer) -> None:
        """No client came back in time: stop generating for nobody."""
        if answer.sink is None and not answer.done and self.clock() - answer.since >= self.seconds - 0.5:
            answer.cancel()

    def _sweep(self) -> None:
        """Forget answers that ended (or were abandoned) longer than the window ago; the oldest past MAX_KEPT."""
        now = self.clock()
        over = [ident for ident, answer in self._answers.items()
                if (answer.done or answer.cancelled and answer.sink is None) and now - answer.since > self.seconds]
        for ident in over:
            del self._answers[ident]
        while len(self._answers) > MAX_KEPT:
            self._answers.popitem(last=False)

    def __len__(self) -> int:
        return len(self._answers)
