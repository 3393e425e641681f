"""``/gpt-socket/<personality>``: each text frame is a prompt; answers stream back and end with ``<END>``.

Plain mode (the reference contract) sends answer text, status lines (``*Fetching https://...*``, a page that
could not be read) before the answer, ``<ERROR> message`` frames and ``<END>``; in the compatibility mode of the
reference design's later clients (``LLM_SOCKET_END_SESSION`` or ``?end=session``) the end frame is
``<END session-id>``. ``?format=json`` sends ``{"type": "token"|"status"|"source"|"error"|"end", ...}`` frames for
rich clients; each frame of an answer there also carries the answer's id and a sequence number, starting with a
``start`` frame, so a client whose connection dropped can resume it (``llm.web.api.answers``:
``?format=json&resume=<answer>&after=<seq>``). A first prompt starting ``|SESSION|<id>|/SESSION|`` names the
conversation; ``|STOP|`` stops the answer in progress. ``|REGENERATE|`` answers the last question again and
``|EDIT|<message id>|/EDIT|<text>`` replaces an earlier question (both keep the earlier variant: messages form a
tree, see ``llm.conversation.store``).

Served natively on the ASGI server (``llm.web.server``): frames are read by a coroutine, so an idle socket holds no
thread and ``|STOP|`` or a disconnect reach the engine at its next step; an answer is prepared and recorded in a
thread of a bounded pool, and its tokens are sent from the event loop as the engine hands them out (``Relay``).
The handshake runs the Flask app's own before-request hooks (authentication, allowed hosts and origins, the rate
limit), so a websocket is admitted by exactly the rules HTTP requests are.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs

from flask import Flask, g
from werkzeug.test import EnvironBuilder

from llm.errors import BadRequest, Gone, NotFound, ServiceError, TooManyRequests
from llm.web.api.answers import Answer, Answers
from llm.web.auth import ANONYMOUS
from llm.web.limits import HANDSHAKE, identity

log = logging.getLogger(__name__)
END, STOP = "<END>", "|STOP|"
SESSION = re.compile(r"^\|SESSION\|(?P<id>[^|]*)\|/SESSION\|\s*", re.DOTALL)
REGENERATE = "|REGENERATE|"
EDIT = re.compile(r"^\|EDIT\|(?P<id>\d{1,18})\|/EDIT\|", re.DOTALL)
ROUTE = re.compile(r"^/gpt-socket/(?P<personality>[^/]+)$")


MAX_UNSENT = 4 << 20  # characters: a reader this far behind (~40,000 token frames) is dropped


class Outbox:
    """One websocket's outgoing text frames, queued from any thread (or the loop) and sent in order by one task.

    An answer's thread used to wait on the event loop for every token it sent (``run_coroutine_threadsafe``):
    two thread wake-ups, a task and a cross-thread future per frame, Python that runs while ``llama_decode``
    keeps the cores busy and so slows every answer. ``put`` never waits (so no thread waits on the loop while
    holding a lock the loop may need, see ``Relay``); a reader more than ``MAX_UNSENT`` behind is failed.
    Once a send fails (the client went away) or the socket closes, every later ``put`` raises, as a direct send
    did. ``drain`` waits until what was queued before it is sent: close frames, sent by the loop itself, follow
    it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send, limit: int = MAX_UNSENT):
        self._loop, self._send, self._limit = loop, send, limit
        self._items: deque[str | asyncio.Future] = deque()  # frames, and the futures of drain() calls
        self._unsent = 0  # characters queued and not yet sent
        self._thread = threading.get_ident()  # the loop's (an outbox is made on it)
        self._lock = threading.Lock()
        self._writing = False  # the writer is sending, or has been woken to: no need to wake it
        self._wake = asyncio.Event()
        self.error: BaseException | None = None
        self.task = loop.create_task(self._write())

    def put(self, text: str) -> None:
        """Queue a frame; raises once the socket is gone or its reader is too far behind."""
        with self._lock:
            if self.error is None and self._unsent + len(text) > self._limit:
                self.error = ConnectionError(f"The client read too slowly ({self._unsent} characters unsent).")
            if self.error is not None:
                raise ConnectionError("The websocket is closed.") from self.error
            self._items.append(text)
            self._unsent += len(text)
            wake, self._writing = not self._writing, True
        if wake:
            self._wake_writer()

    async def drain(self) -> None:
        """Until every frame queued so far has been sent (or the socket has failed)."""
        with self._lock:
            if self.error is not None or (not self._items and not self._writing):
                return
            done = self._loop.create_future()
            self._items.append(done)
            wake, self._writing = not self._writing, True
        if wake:
            self._wake.set()
        await done

    def close(self, error: BaseException | None = None) -> None:
        """No more frames (on the loop): queued ones are dropped, drains released."""
        with self._lock:
            self.error = self.error or error or ConnectionError("The websocket closed.")
            items, self._items, self._writing = list(self._items), deque(), False
        for item in items:
            if isinstance(item, asyncio.Future) and not item.done():
                item.set_result(None)
        self.task.cancel()

    def _wake_writer(self) -> None:
        try:
            if threading.get_ident() == self._thread:
                self._wake.set()
            else:
                self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop has closed: the server is stopping
            pass

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                with self._lock:
                    if not self._items:
                        self._writing = False
                        break
                    item = self._items.popleft()
                if isinstance(item, asyncio.Future):
                    item.set_result(None)
                    continue
                try:
                    await self._send({"type": "websocket.send", "text": item})
                except Exception as exc:  # noqa: BLE001 - the client went away: later puts raise this
                    self.close(exc)
                    return
                with self._lock:
                    self._unsent -= len(item)


class Relay:
    """Hands answers' pieces from the engine's thread to the event loop: one wake-up of the loop per burst for
    every socket, instead of a thread woken per token.

    The scheduler hands a step's pieces out together; each answer's ``notify`` marks it ready and only the first
    of the burst wakes the loop, which then sends every ready answer's pieces. Its answer thread sleeps until the
    end (``RelayedAnswer``): per token, no thread wakes at all."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._ready: dict[Callable[[], None], None] = {}  # insertion-ordered set
        self._lock = threading.Lock()
        self._scheduled = False

    def notify(self, consumer: Callable[[], None]) -> None:
        """From any thread (the scheduler's): quick, never blocks."""
        with self._lock:
            self._ready[consumer] = None
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop has closed (the server is stopping): the consumers run here
            self._run()

    def _run(self) -> None:
        with self._lock:
            ready, self._ready, self._scheduled = list(self._ready), {}, False
        for consumer in ready:
            consumer()


class RelayedAnswer:
    """One answer's pieces, sent as frames from the event loop while its thread waits for the end."""

    def __init__(self, turn, frames: Frames):
        self.turn, self.frames = turn, frames
        self.done = threading.Event()
        self.failure: BaseException | None = None  # a send that failed (the client went away)

    def __call__(self) -> None:
        if self.done.is_set():
            return
        try:
            pieces, done = self.turn.take()
            for piece in pieces:
                self.frames.send("token", piece)
        except Exception as exc:  # noqa: BLE001 - raised on the answer's thread
            self.failure, done = exc, True
        if done:
            self.done.set()

    def wait(self) -> None:
        """Until the answer ended (its error raised, as iterating ``pieces()`` would) or a send failed."""
        turn = self.turn
        if not self.done.wait(timeout=max(0.0, turn.handle.deadline - time.monotonic())):
            turn.ended(turn.handle.timed_out())
        if self.failure is not None:
            turn.cancel()
            try:
                turn.ended()
            except Exception:  # noqa: BLE001 - the failed send is what ended this answer
                pass
            raise self.failure
        turn.ended()


class Frames:
    """Writes one answer's frames in plain or JSON mode through ``send_text`` (callable from any thread)."""

    def __init__(self, send_text, json_mode: bool, end_with_session: bool = False):
        self.send_text, self.json_mode, self.end_with_session = send_text, json_mode, end_with_session
        self.answer: Answer | None = None  # JSON mode: the resumable answer these frames belong to

    def send(self, kind: str, text: str = "", **fields: Any) -> None:
        if self.json_mode:
            frame = {"type": kind, **({"text": text} if kind == "token" else {}), **fields}
            if self.answer is not None:
                self.answer.emit(frame)  # numbered and kept, then sent if the socket is still there
            else:
                self.send_text(json.dumps(frame))
        elif kind == "token" and text:
            self.send_text(text)
        elif kind == "status":  # where a plain client's user looks: in the answer's text, before the answer
            self.send_text(f"*{fields['message']}*\n\n")
        elif kind == "error":
            self.send_text(f"<ERROR> {fields['message']}")
        elif kind == "end":
            session = fields.get("conversation")
            self.send_text(f"<END {session}>" if self.end_with_session and session else END)

    def error(self, error: ServiceError) -> None:
        self.send("error", message=error.message, error=error.type, status=error.status)


class SocketSession:
    """One websocket's conversation and the answer in progress; ``answer`` runs in a worker thread.

    ``current`` is what ``|STOP|`` cancels: the turn, or in JSON mode the resumable answer around it (which a
    closing socket detaches instead of cancelling, see ``llm.web.api.answers``)."""

    def __init__(self, llm: Any, send_text, personality: str, json_mode: bool, user: str, charge=None,
                 end_with_session: bool = False, answers: Answers | None = None, owner: str = "", *,
                 relay: Relay):
        self.llm, self.personality, self.user = llm, personality, user
        self.relay = relay  # an answer's pieces go out from the event loop
        self.frames = Frames(send_text, json_mode, end_with_session)
        self.charge = charge or (lambda: None)  # the user's rate budget, one unit per prompt
        self.answers = answers if json_mode else None
        self.owner = owner  # who may resume this socket's answers
        self.conversation_id: str | None = None
        self.current = None
        self.closed = threading.Event()
        self._lock = threading.Lock()

    def cancel_current(self) -> None:
        with self._lock:
            if self.current is not None:
                self.current.cancel()

    def close(self) -> None:
        """The socket closed: the answer in progress is cancelled, or detached to be resumed."""
        self.closed.set()
        with self._lock:
            current = self.current
        if isinstance(current, Answer):
            self.answers.detach(current, self.frames.send_text)
        elif current is not None:
            current.cancel()

    def _set_current(self, current, expected=None) -> None:
        with self._lock:
            if expected is None or self.current is expected:
                self.current = current

    def refuse_unknown_personality(self) -> bool:
        """An unknown personality is answered with an error frame and the end frame, as the reference does."""
        try:
            self.llm.personalities.get(self.personality)
            return False
        except ServiceError as error:
            if self.llm.chat.observer is not None:
                self.llm.chat.observer.socket_refused(self.personality, error)
            self.frames.error(error)
            self.frames.send("end")
            return True

    def answer(self, message: Any) -> None:
        """One prompt frame to one answer, always closed by an end frame."""
        try:
            if not isinstance(message, str):
                raise BadRequest("Binary frames are not accepted; send the prompt as a text frame.")
            self.charge()
            prompt = self._take_session(message)
            edit = EDIT.match(prompt)
            if prompt.strip() == REGENERATE:
                self._generate("", regenerate=True)
                return
            if edit is not None:
                self._generate(prompt[edit.end():], edit=int(edit["id"]))
                return
            if prompt.strip():
                self._generate(prompt)
                return
            self.frames.send("end", conversation=self._ensure_conversation(), usage=None, trimmed_turns=0)
        except ServiceError as error:
            if self.llm.chat.observer is not None:
                self.llm.chat.observer.socket_refused(self.personality, error)
            self.frames.error(error)
            self.frames.send("end", conversation=self.conversation_id or (
                self._ensure_conversation() if self.frames.end_with_session else None))
        finally:
            self.frames.answer = None
            self._set_current(None)

    def resume(self, answer: Answer | None, after: int) -> None:
        """Continue an answer whose socket dropped: the frames after ``after``, then the rest as they come."""
        if answer is None:
            self.frames.error(Gone("That answer can no longer be resumed (it ended too long ago, or it is not "
                                   "yours); load the conversation to see it."))
            self.frames.send("end")
            return
        self.conversation_id = answer.conversation
        self._set_current(answer)
        try:
            answer.attach(self.frames.send_text, after)
            answer.wait(self.frames.send_text)
        finally:
            self._set_current(None, expected=answer)

    def _take_session(self, message: str) -> str:
        match = SESSION.match(message)
        if match is None:
            return message
        if self.conversation_id is not None and self.conversation_id != match["id"].strip():
            raise BadRequest("This socket already continues another conversation; open a new socket.")
        self.conversation_id = self.llm.store.open(match["id"], self.personality, self.user).id
        return message[match.end():]

    def _ensure_conversation(self) -> str:
        if self.conversation_id is None:
            self.conversation_id = self.llm.store.open(None, self.personality, self.user).id
        return self.conversation_id

    def _generate(self, prompt: str, **branch: Any) -> None:
        """One answer; ``branch``: ``regenerate=True`` or ``edit=<message id>`` (``ChatService.start``)."""
        frames = self.frames
        conversation = self._ensure_conversation()
        answer = None
        if self.answers is not None:
            answer = frames.answer = self.answers.start(self.owner, conversation, frames.send_text)
            self._set_current(answer)
            frames.send("start", conversation=conversation)
        turn = self.llm.chat.start(self.personality, prompt, conversation_id=conversation,
                                   on_status=lambda text: frames.send("status", message=text), channel="socket",
                                   user=self.user, **branch)
        if answer is not None:
            answer.turn = turn
        else:
            self._set_current(turn)
        try:
            if answer.cancelled if answer is not None else self.closed.is_set():
                turn.cancel()
            for source in turn.sources:  # notices already went out as status frames while preparing
                frames.send("source", **source)
            relayed = RelayedAnswer(turn, frames)
            turn.handle.listen(lambda: self.relay.notify(relayed))
            relayed.wait()
        finally:
            turn.cancel()
        turn.finish()
        message_id = turn.assistant_turn.message_id if turn.assistant_turn else None
        frames.send("end", conversation=self.conversation_id, usage=turn.handle.usage.as_dict(),
                    finish_reason=turn.handle.finish_reason, trimmed_turns=turn.trimmed, message_id=message_id,
                    question_id=turn.user_turn.message_id, notices=turn.notices)


class SocketRegistry:
    """Open websockets per user (per address when anonymous), capped by LLM_MAX_SOCKETS_PER_USER, and the
    thread pool answers run in."""

    def __init__(self, cap: int, threads: int, answers: Answers):
        self.cap = cap
        self.open: Counter = Counter()
        self._lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ws-answer")
        self.answers = answers
        self._running: set[asyncio.Task] = set()  # answers whose socket closed (asyncio keeps tasks weakly)
        self._relays: dict[asyncio.AbstractEventLoop, Relay] = {}

    def relay(self, loop: asyncio.AbstractEventLoop) -> Relay:
        """The loop's relay (one for all its sockets, so one wake-up serves a whole step)."""
        with self._lock:
            if loop not in self._relays:
                self._relays[loop] = Relay(loop)
            return self._relays[loop]

    def keep(self, task: asyncio.Task) -> None:
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def acquire(self, who: str) -> bool:
        with self._lock:
            if self.cap and self.open[who] >= self.cap:
                return False
            self.open[who] += 1
            return True

    def release(self, who: str) -> None:
        with self._lock:
            self.open[who] -= 1
            if self.open[who] <= 0:
                del self.open[who]


def _environ(scope: dict) -> dict:
    """A WSGI environ for the handshake, so Flask's before-request hooks can judge it like any request."""
    headers = [(key.decode("latin1"), value.decode("latin1")) for key, value in scope.get("headers", [])]
    return EnvironBuilder(path=scope["path"], query_string=scope.get("query_string", b"").decode("latin1"),
                          headers=headers, environ_base={"REMOTE_ADDR": _address(scope), HANDSHAKE: True}
                          ).get_environ()


def handshake(app: Flask, scope: dict) -> tuple[str, Any]:
    """Run the app's before-request hooks for the upgrade request; the user, and the rate budget to charge."""
    with app.request_context(_environ(scope)):
        response = app.preprocess_request()  # our hooks refuse by raising a ServiceError
        if response is not None:  # a hook that answers instead: the upgrade is refused with its status
            raise ServiceError(f"The connection was refused ({response.status}).")
        user = g.user
    budget = app.extensions.get("llm_budget")
    charge = (lambda: budget.charge(user, _address(scope))) if budget is not None else None
    return user, charge


def _address(scope: dict) -> str:
    return (scope.get("client") or ("",))[0]


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


async def _deny(scope: dict, send, error: ServiceError) -> None:
    """Refuse the upgrade with the HTTP status and JSON error body, where the server can send one."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = json.dumps(error.to_dict()).encode()
        headers = [(b"content-type", b"application/json"), *((k.lower().encode(), v.encode())
                                                           for k, v in error.headers.items())]
        await send({"type": "websocket.http.response.start", "status": error.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


async def serve_websocket(app: Flask, scope: dict, receive, send) -> None:
    """One websocket from handshake to close."""
    loop = asyncio.get_running_loop()
    if (await receive())["type"] != "websocket.connect":
        return
    llm, registry = app.extensions["llm"], app.extensions["llm_sockets"]
    route = ROUTE.match(scope["path"])
    try:
        if route is None:
            raise NotFound(f"No websocket at {scope['path']}; use /gpt-socket/<personality>.")
        user, charge = await loop.run_in_executor(registry.executor, handshake, app, scope)
    except ServiceError as error:
        await _deny(scope, send, error)
        return
    who = identity(user, _address(scope))  # the user, or the address when anonymous, as for rate budgets
    if not registry.acquire(who):
        await _deny(scope, send, TooManyRequests(
            f"Too many open websockets for this user (LLM_MAX_SOCKETS_PER_USER={registry.cap}); close some first."))
        return
    try:
        await send({"type": "websocket.accept"})
        await _converse(llm, registry, scope, receive, send, user, charge, route["personality"])
    finally:
        registry.release(who)


async def _converse(llm, registry, scope, receive, send, user, charge, personality) -> None:
    """Read frames until the socket closes; prompts are answered one after another in the answer pool."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    outbox = Outbox(loop, send)  # every frame after the accept goes through it, close frames after a drain
    query = parse_qs(scope.get("query_string", b"").decode("latin1"))
    flags = query.get("format", []) + query.get("end", [])
    end_with_session = "session" in flags or (llm.settings.socket_end_session and "plain" not in flags)
    owner = user if user != ANONYMOUS else f"addr:{_address(scope)}"  # who may resume (not the address alone:
    # a phone that changes network keeps its cookie identity)
    session = SocketSession(llm, outbox.put, personality, "json" in flags, user, charge, end_with_session,
                            registry.answers, owner, relay=registry.relay(loop))
    if await loop.run_in_executor(registry.executor, session.refuse_unknown_personality):
        await outbox.drain()
        await send({"type": "websocket.close", "code": 1000})
        outbox.close()
        return
    prompts: asyncio.Queue = asyncio.Queue()
    if session.answers is not None and query.get("resume"):
        resumed = session.answers.claim(query["resume"][0], owner)
        session.current = resumed  # at once, so a |STOP| that follows the reconnection stops it
        prompts.put_nowait((resumed, _int(query.get("after", ["0"])[0])))

    async def answer_in_turn() -> None:
        while (message := await prompts.get()) is not None and not session.closed.is_set():
            work = (session.resume, *message) if isinstance(message, tuple) else (session.answer, message)
            try:
                await loop.run_in_executor(registry.executor, *work)
            except Exception:  # the client went away mid-answer, or a bug: never leave the socket unserved
                if session.closed.is_set():
                    return
                log.exception("websocket answer failed")
                await outbox.drain()
                await send({"type": "websocket.close", "code": 1011})
                return

    worker = loop.create_task(answer_in_turn())
    idle = llm.settings.socket_idle_timeout
    try:
        while True:
            try:
                event = await asyncio.wait_for(receive(), timeout=idle)
            except TimeoutError:
                if session.current is None and prompts.empty():
                    await outbox.drain()
                    await send({"type": "websocket.close", "code": 1000, "reason": "idle"})
                    return
                continue
            if event["type"] == "websocket.disconnect":
                return
            if event["type"] != "websocket.receive":
                continue
            message = event.get("text") if event.get("text") is not None else event.get("bytes")
            if message == STOP:
                session.cancel_current()
            else:
                prompts.put_nowait(message)
    finally:
        session.close()
        prompts.put_nowait(None)
        if isinstance(session.current, Answer):  # detached: it runs on (or is cancelled) without this socket
            registry.keep(worker)
        else:
            try:
                await worker
            except Exception:  # noqa: BLE001 - the client is gone; sends to it fail
                pass
        outbox.close()
        if llm.chat.observer is not None:
            llm.chat.observer.websocket_closed(path=scope["path"], duration=time.monotonic() - started, user=user)
