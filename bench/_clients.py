"""Streaming clients for both sides, timed from the client's point of view.

Times are what a user would see: the clock starts before connecting, the first token is the first frame or
event that carries text, the end is the end frame (ours) or the event with a finish reason (the peer).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests
import websocket

TIMEOUT = 300.0


@dataclass
class Stream:
    """One answer as the client saw it (perf_counter seconds)."""

    start: float
    first: float
    end: float
    tokens: int
    finish_reason: str | None
    server_rate: float | None = None  # ours only: the scheduler's own tokens/s from the end frame's usage
    text: str = ""  # ours only: the answer, to compare outputs

    @property
    def ttft(self) -> float:
        return self.first - self.start

    @property
    def decode_rate(self) -> float:
        """Tokens per second between the first token and the end: the pure decode speed of one stream."""
        return (self.tokens - 1) / (self.end - self.first) if self.tokens > 1 and self.end > self.first else 0.0


class SocketClient:
    """Our ``/gpt-socket/<personality>?format=json``: one socket, one conversation, prompts answered in turn."""

    def __init__(self, base: str, personality: str):
        self.start = time.perf_counter()
        url = base.replace("http://", "ws://") + f"/gpt-socket/{personality}?format=json"
        self.ws = websocket.create_connection(url, timeout=TIMEOUT)

    def ask(self, prompt: str, start: float | None = None) -> Stream:
        """Send a prompt and read frames until its end frame; usage gives the exact token count."""
        start = time.perf_counter() if start is None else start
        self.ws.send(prompt)
        first, text = None, []
        while True:
            frame = json.loads(self.ws.recv())
            if frame["type"] == "token":
                first = first or time.perf_counter()
                text.append(frame["text"])
            elif frame["type"] == "error":
                raise RuntimeError(f"our service answered an error: {frame}")
            elif frame["type"] == "end":
                end = time.perf_counter()
                usage = frame.get("usage") or {}
                return Stream(start, first or end, end, usage.get("completion_tokens", 0),
                              frame.get("finish_reason"), usage.get("tokens_per_second"), "".join(text))

    def close(self) -> None:
        self.ws.close()


def ask_ours(base: str, prompt: str, personality: str = "bench") -> Stream:
    """A new user: connect, ask once, disconnect (the clock includes the websocket handshake)."""
    client = SocketClient(base, personality)
    try:
        return client.ask(prompt, start=client.start)
    finally:
        client.close()


def ask_peer(base: str, prompt: str, max_tokens: int) -> Stream:
    """A streaming ``/v1/completions`` call; a ``length`` finish means exactly ``max_tokens`` tokens."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "top_p": 1, "repeat_penalty": 1.0,
            "stop": ["<end_of_turn>"], "stream": True}
    start = time.perf_counter()
    first, chunks, reason = None, 0, None
    with requests.post(base + "/v1/completions", json=body, stream=True, timeout=(10, TIMEOUT)) as response:
        response.raise_for_status()
        # chunk_size=None: hand over each event as it arrives, never wait to fill a buffer.
        for line in response.iter_lines(chunk_size=None):
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("text"):
                first = first or time.perf_counter()
                chunks += 1
            if choice.get("finish_reason"):
                reason = choice["finish_reason"]
                break
    end = time.perf_counter()
    tokens = max_tokens if reason == "length" else chunks  # llama-cpp-python streams one token per event
    return Stream(start, first or end, end, tokens, reason)


def ask_chat(base: str, prompt: str, max_tokens: int, system: str | None = None, **extra) -> Stream:
    """Our streaming ``/v1/chat/completions`` (``extra``: tools, tool_choice, ignore_eos...); the first token is
    the first delta with content or call arguments, the count comes from the usage chunk."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    start = time.perf_counter()
    first, reason, tokens = None, None, 0
    with requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=(10, TIMEOUT)) as response:
        response.raise_for_status()
        for line in response.iter_lines(chunk_size=None):
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"our service answered an error: {event}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                if first is None and (delta.get("content") or delta.get("tool_calls")):
                    first = time.perf_counter()
                reason = choice.get("finish_reason") or reason
    end = time.perf_counter()
    return Stream(start, first or end, end, tokens, reason)


def run_together(ask: Callable[[str], Stream], prompts: list[str]) -> list[Stream]:
    """Every prompt from its own client thread, released at the same instant."""
    barrier = threading.Barrier(len(prompts))

    def client(prompt: str) -> Stream:
        barrier.wait(timeout=60)
        return ask(prompt)

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(client, prompts, timeout=TIMEOUT))


def aggregate(streams: list[Stream]) -> tuple[float, float, int]:
    """Tokens per second over the whole run (first start to last end), worst first-token time, total tokens."""
    total = sum(stream.tokens for stream in streams)
    wall = max(stream.end for stream in streams) - min(stream.start for stream in streams)
    return total / wall, max(stream.ttft for stream in streams), total
