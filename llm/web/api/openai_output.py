"""What ``/v1`` sends back: choices, streamed chunks (several choices interleaved, tool-call deltas, log
probabilities) and server-sent events, in OpenAI's shapes (the Anthropic API reuses the event writer)."""

from __future__ import annotations

import json
import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

from flask import Response

from llm.conversation.service import ActiveTurn
from llm.engine import TokenLogprob
from llm.engine.tools import CallReader
from llm.errors import IncompleteOutput, ServiceError
from llm.schema_support import validate_output
from llm.web.server import on_disconnect

IMPOSSIBLE = -9999.0  # OpenAI's log-probability for a token that cannot be chosen (JSON has no -inf)


def usage_of(*turns: ActiveTurn) -> dict[str, int]:
    """Usage of one answer, or of several choices to one prompt (its tokens counted once, as OpenAI does)."""
    first = turns[0].handle.usage
    completion = sum(turn.handle.usage.completion_tokens for turn in turns)
    return {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
            "total_tokens": first.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}


def finish_reason(turn: ActiveTurn) -> str:
    return "length" if turn.handle.finish_reason == "length" else "stop"


def start_choices(start: Callable[[dict], ActiveTurn], sampling: dict, count: int) -> list[ActiveTurn]:
    """``count`` answers submitted together (the scheduler decodes them in one batch), each with its own seed;
    a client that goes away cancels them all."""
    seed = sampling.get("seed")
    turns = [start(sampling if count == 1 else {**sampling, "seed": None if seed is None else seed + index})
             for index in range(count)]
    for turn in turns:
        on_disconnect(turn.cancel)
    return turns


def run_choices(start: Callable[[dict], ActiveTurn], sampling: dict, count: int) -> tuple[list[ActiveTurn],
                                                                                          list[str]]:
    """The choices' whole texts."""
    turns = start_choices(start, sampling, count)
    try:
        return turns, ["".join(turn.pieces()) for turn in turns]
    finally:
        for turn in turns:
            turn.cancel()


def answer(turn: ActiveTurn, text: str) -> dict:
    """One choice's message and finish reason: text, or the calls the model made."""
    tools = turn.tools
    if tools is None:
        return {"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason(turn)}
    content, calls = tools.parse(text, turn.handle.finish_reason)
    if not calls:
        return {"message": {"role": "assistant", "content": content}, "finish_reason": finish_reason(turn)}
    return {"message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in calls]}, "finish_reason": "tool_calls"}


# ----- log probabilities ---------------------------------------------------------------------------------------

def _number(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else IMPOSSIBLE


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict:
    """``choices[].logprobs`` of a chat completion: each token with its bytes and its most likely alternatives."""
    return {"content": [{"token": _text(entry.token), "logprob": _number(entry.logprob), "bytes": list(entry.token),
                         "top_logprobs": [{"token": _text(token), "logprob": _number(value), "bytes": list(token)}
                                          for token, value in entry.top]} for entry in entries],
            "refusal": None}


def text_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict:
    """``choices[].logprobs`` of a text completion (the legacy parallel-lists shape); ``offset``: characters of
    the answer before these tokens."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(_text(entry.token))
    return {"tokens": [_text(entry.token) for entry in entries],
            "token_logprobs": [_number(entry.logprob) for entry in entries],
            "top_logprobs": [{_text(token): _number(value) for token, value in entry.top} for entry in entries],
            "text_offset": offsets}


# ----- streaming -----------------------------------------------------------------------------------------------

def interleaved(turns: list[ActiveTurn]) -> Iterator[tuple[int, str]]:
    """(choice index, piece) from several answers as they are produced; one answer is read directly, several
    through one queue fed by a reader thread each (an answer's failure is raised here)."""
    if len(turns) == 1:
        yield from ((0, piece) for piece in turns[0].pieces())
        return
    pieces: queue.SimpleQueue = queue.SimpleQueue()

    def pump(index: int, turn: ActiveTurn) -> None:
        try:
            for piece in turn.pieces():
                pieces.put((index, piece, None))
            pieces.put((index, None, None))
        except Exception as error:  # noqa: BLE001 - handed to the reading side, which raises it
            pieces.put((index, None, error))

    for index, turn in enumerate(turns):
        threading.Thread(target=pump, args=(index, turn), daemon=True, name=f"choice-{index}").start()
    running = len(turns)
    while running:
        index, piece, error = pieces.get()
        if error is not None:
            raise error
        if piece is None:
            running -= 1
        else:
            yield index, piece


class ChoiceStream:
    """One choice of a streamed chat completion: its deltas (text, or tool calls once the reader knows), the log
    probabilities not yet sent, and its finish."""

    def __init__(self, turn: ActiveTurn, logprobs: bool):
        self.turn, self.tools, self.logprobs = turn, turn.tools, logprobs
        self.reader = CallReader(self.tools.format) if self.tools is not None else None
        self.announced = self.reader is None  # with tools the role rides on the first delta
        self.sent = 0  # log-probability entries already sent

    def opening(self) -> list[dict]:
        return [{"role": "assistant", "content": ""}] if self.reader is None else []

    def deltas(self, piece: str) -> Iterator[dict]:
        if self.reader is None:
            yield {"content": piece}
        else:
            yield from self._announce(self.reader.feed(piece))

    def _announce(self, events: Iterator[tuple]) -> Iterator[dict]:
        for delta in map(tool_delta, events):
            yield delta if self.announced else {"role": "assistant", "content": None, **delta}
            self.announced = True

    def pending_logprobs(self) -> dict | None:
        """Entries produced since the last chunk, or None when not asked for (or none new)."""
        entries = self.turn.handle.logprobs[self.sent:]
        if not self.logprobs or not entries:
            return None
        self.sent += len(entries)
        return chat_logprobs(entries)

    def closing(self) -> tuple[list[dict], str]:
        """The last deltas (a short undecided answer is text) and the finish reason; calls are validated."""
        reason = finish_reason(self.turn)
        if self.reader is None:
            return [], reason
        last = list(self._announce(self.reader.close()))
        if self.reader.finish(self.tools, self.turn.handle.finish_reason)[1]:
            reason = "tool_calls"
        return last, reason


def chat_chunks(turns: list[ActiveTurn], ident: str, created: int, name: str, include_usage: bool,
                constraint, schema, logprobs: bool) -> Iterator[dict]:
    """Chunks of one or several choices as they are produced, each choice ending with its finish reason."""
    def chunk(index: int, delta: dict, reason: str | None = None, probs: dict | None = None) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": probs}]}

    streams = [ChoiceStream(turn, logprobs) for turn in turns]
    for index, stream in enumerate(streams):
        yield from (chunk(index, delta) for delta in stream.opening())
    try:
        for index, piece in interleaved(turns):
            for delta in streams[index].deltas(piece):
                yield chunk(index, delta, probs=streams[index].pending_logprobs())
    finally:
        for turn in turns:
            turn.cancel()
    for index, stream in enumerate(streams):
        last, reason = stream.closing()
        yield from (chunk(index, delta) for delta in last)
        if constraint is not None:
            if stream.turn.handle.finish_reason == "length":
                raise IncompleteOutput("The JSON value was not complete within max_tokens; raise max_tokens.")
            validate_output(schema, stream.turn.text)
        yield chunk(index, {}, reason, stream.pending_logprobs())
    if include_usage:
        yield {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [],
               "usage": usage_of(*turns)}


def tool_delta(event: tuple) -> dict:
    """A reader event as OpenAI streams it: a call opens with its id and name, then its arguments stream."""
    if event[0] == "text":
        return {"content": event[1]}
    if event[0] == "call":
        return {"tool_calls": [{"index": event[1], "id": event[2], "type": "function",
                                "function": {"name": event[3], "arguments": ""}}]}
    return {"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]}


def text_chunks(turns: list[ActiveTurn], ident: str, created: int, name: str, logprobs: bool) -> Iterator[dict]:
    """Chunks of a streamed text completion, one or several choices."""
    sent, written = [0] * len(turns), [0] * len(turns)

    def chunk(index: int, text: str, reason: str | None = None) -> dict:
        entries = turns[index].handle.logprobs[sent[index]:]
        probs = text_logprobs(entries, written[index]) if logprobs and entries else None
        sent[index] += len(entries)
        written[index] += len(text)
        return {"id": ident, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": probs}]}

    try:
        yield from (chunk(index, piece) for index, piece in interleaved(turns))
        yield from (chunk(index, "", finish_reason(turn)) for index, turn in enumerate(turns))
    finally:
        for turn in turns:
            turn.cancel()


def sse_lines(events: Iterator[dict], named: bool = False) -> Iterator[str]:
    """Events as server-sent event lines; an error mid-stream becomes an error event. ``named``: Anthropic's
    style (``event: <type>`` lines, no ``[DONE]``); else OpenAI's (``data:`` only, ending with ``[DONE]``)."""
    try:
        for event in events:
            head = f"event: {event['type']}\n" if named else ""
            yield f"{head}data: {json.dumps(event, ensure_ascii=False)}\n\n"
    except ServiceError as error:
        if named:
            from llm.web.api.anthropic import error_body

            yield f"event: error\ndata: {json.dumps(error_body(error.message, error.status))}\n\n"
        else:
            yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.type, 'code': None}})}\n\n"
    finally:
        events.close()  # runs the generator's cleanup, which cancels the engine request
    if not named:
        yield "data: [DONE]\n\n"


def sse(events: Iterator[dict]) -> Response:
    """OpenAI's server-sent events; a client that goes away cancels generation."""
    return Response(sse_lines(events), mimetype="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                               "X-Accel-Buffering": "no"})
