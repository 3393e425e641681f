"""``/gpt-socket/<personality>``: each text frame is a prompt; answers stream back and end with ``<END>``.

Plain mode (the reference contract) sends nothing but answer text, ``<ERROR> message`` frames and ``<END>``.
``?format=json`` sends ``{"type": "token"|"status"|"source"|"error"|"end", ...}`` frames for rich clients.
A first prompt starting ``|SESSION|<id>|/SESSION|`` names the conversation; ``|STOP|`` stops the answer in
progress. A reader thread watches the socket while an answer streams, so ``|STOP|`` and disconnects take
effect at the engine's next step instead of after the answer.
"""

from __future__ import annotations

import json
import queue
import re
import threading
from typing import Any

from flask import current_app, request
from simple_websocket import ConnectionClosed

from llm.auth import current_user
from llm.errors import BadRequest, ServiceError

END, STOP = "<END>", "|STOP|"
SESSION = re.compile(r"^\|SESSION\|(?P<id>[^|]*)\|/SESSION\|\s*", re.DOTALL)
_CLOSED = object()


class Frames:
    """Writes one answer's frames in plain or JSON mode."""

    def __init__(self, ws, json_mode: bool):
        self.ws, self.json_mode = ws, json_mode

    def send(self, kind: str, text: str = "", **fields: Any) -> None:
        if self.json_mode:
            self.ws.send(json.dumps({"type": kind, **({"text": text} if kind == "token" else {}), **fields}))
        elif kind == "token" and text:
            self.ws.send(text)
        elif kind == "error":
            self.ws.send(f"<ERROR> {fields['message']}")
        elif kind == "end":
            self.ws.send(END)

    def error(self, error: ServiceError) -> None:
        self.send("error", message=error.message, error=error.type, status=error.status)


class SocketSession:
    """One websocket: its conversation, the answer in progress and the frames still to handle."""

    def __init__(self, ws, personality: str, json_mode: bool):
        self.ws, self.personality = ws, personality
        self.frames = Frames(ws, json_mode)
        self.llm = current_app.extensions["llm"]
        self.user = current_user()
        self.conversation_id: str | None = None
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.current = None
        self.closed = threading.Event()
        self._lock = threading.Lock()

    def read_forever(self) -> None:
        """Reader thread: queue prompts, act on |STOP| and on the socket closing at once."""
        while True:
            try:
                message = self.ws.receive(timeout=5)
            except ConnectionClosed:
                message = None
            if message is None and self.ws.connected:
                continue  # nothing arrived within the timeout (and a close is noticed even if signalled early)
            if message is None:
                self.closed.set()
                self._cancel_current()
                self.inbox.put(_CLOSED)
                return
            if message == STOP:
                self._cancel_current()
            else:
                self.inbox.put(message)

    def _cancel_current(self) -> None:
        with self._lock:
            if self.current is not None:
                self.current.cancel()

    def serve(self) -> None:
        """Answer frames one after another until the socket closes."""
        try:
            self.llm.personalities.get(self.personality)
        except ServiceError as error:
            if self.llm.chat.observer is not None:
                self.llm.chat.observer.socket_refused(self.personality, error)
            self.frames.error(error)
            self.frames.send("end")
            return
        threading.Thread(target=self.read_forever, name="ws-reader", daemon=True).start()
        while True:
            message = self.inbox.get()
            if message is _CLOSED:
                return
            try:
                self.answer(message)
            except ConnectionClosed:
                self._cancel_current()
                return

    def answer(self, message: Any) -> None:
        """One prompt frame to one answer, always closed by an end frame."""
        try:
            if not isinstance(message, str):
                raise BadRequest("Binary frames are not accepted; send the prompt as a text frame.")
            prompt = self._take_session(message)
            if prompt.strip():
                self._generate(prompt)
                return
            self.frames.send("end", conversation=self._ensure_conversation(), usage=None, trimmed_turns=0)
        except ServiceError as error:
            self.frames.error(error)
            self.frames.send("end", conversation=self.conversation_id)

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

    def _generate(self, prompt: str) -> None:
        frames = self.frames
        status = (lambda text: frames.send("status", message=text)) if frames.json_mode else None
        turn = self.llm.chat.start(self.personality, prompt, conversation_id=self._ensure_conversation(),
                                   on_status=status, channel="socket", user=self.user)
        with self._lock:
            self.current = turn
        try:
            if self.closed.is_set():
                turn.cancel()
            for source in turn.sources:  # notices already went out as status frames while preparing
                frames.send("source", **source)
            for piece in turn.pieces():
                frames.send("token", piece)
        finally:
            with self._lock:
                self.current = None
            turn.cancel()
        turn.finish()
        message_id = turn.assistant_turn.message_id if turn.assistant_turn else None
        frames.send("end", conversation=self.conversation_id, usage=turn.handle.usage.as_dict(),
                    finish_reason=turn.handle.finish_reason, trimmed_turns=turn.trimmed, message_id=message_id)


def register(sock) -> None:
    """Attach the websocket route to a flask_sock.Sock."""

    @sock.route("/gpt-socket/<personality>")
    def gpt_socket(ws, personality: str):
        SocketSession(ws, personality, request.args.get("format") == "json").serve()
