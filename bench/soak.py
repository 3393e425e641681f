"""Load and soak test: the real service on the embedded model under 40 concurrent users for a bounded time.

``python app.py`` runs as a subprocess on 127.0.0.1 (a free port, LLM_PARALLEL=8, LLM_QUEUE_SIZE=64) with two
short-answer personalities and its own SQLite database. 32 websocket users (JSON mode) each hold one named
conversation at a time (``|SESSION|soak-<run>-<n>-<k>|/SESSION|``, 3 to 6 turns) and 8 HTTP users call
``/gpt/<personality>`` with their own sessions. Every prompt carries a code issued to its user ("Repeat the
code K-7QX2M9PD:") so an answer that reaches the wrong user, or an end frame naming another conversation, is
caught. Users stop answers (``|STOP|``) and hang up mid-answer at random, then come back to the same
conversation.

It passes (exit 0) when every prompt got exactly one end frame (or was deliberately abandoned), nothing was
mixed up, no 5xx other than 503 (overloaded) came back, and resident memory grew less than 10% from the end of
a warm-up under the same load (60 s: the KV cache's pages become resident as it fills and evicted
conversations' saved states accumulate, growth by design bounded by LLM_CACHE_TOKENS and LLM_SUSPEND_MB,
which the soak keeps small so both are full by then) to the end. ``make soak`` measures 300 s;
``--seconds N`` or ``--quick`` (30 s) shorten it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests
import websocket
from _servers import Server, free_port

SOCKET_USERS, HTTP_USERS = 32, 8
# The server ends every answer within LLM_REQUEST_TIMEOUT (300 s, queueing included) with an end frame, an error
# at worst; a user that waits 30 s longer than that and gets nothing has lost its answer.
ANSWER_TIMEOUT = 330.0
DRAIN = 360.0  # after the deadline, seconds allowed for answers in flight to end
# Codes from 31**8 (about 10**12) values: a code the model invents cannot match one issued to someone else by
# chance, so an answer holding another user's code came from that user's conversation.
ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE = re.compile(r"K-[A-Z0-9]{8}")
PERSONALITY = """\
name = "{name}"
description = "Soak test personality: short answers."
intro = "Soak."
include_date = {date}
system_prompt = "You are a helpful assistant. Repeat codes exactly when asked."

[sampling]
temperature = 0.8
top_p = 0.95
repeat_penalty = 1.1
max_tokens = {tokens}
"""
PERSONALITIES = ("soak", "soak-dated")
QUESTIONS = ("Name a colour.", "What is a lighthouse?", "Say hello.", "Count to five.", "Describe rain briefly.",
             "What do bees make?", "Give me a word that rhymes with cat.", "Why is the sky blue?")


@dataclass
class Tally:
    """What all users saw, added to under a lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    messages: dict[str, set] = field(default_factory=dict)  # kind -> a few distinct messages
    ttft: list[float] = field(default_factory=list)
    server_ttft: list[float] = field(default_factory=list)
    issued: dict[str, tuple[int, str]] = field(default_factory=dict)  # code -> (user, conversation)
    problems: list[str] = field(default_factory=list)

    def add(self, name: str, amount: int = 1) -> None:
        with self.lock:
            self.counts[name] += amount

    def error(self, kind: str, message: str = "") -> None:
        with self.lock:
            self.errors[kind] += 1
            seen = self.messages.setdefault(kind, set())
            if message and len(seen) < 3:
                seen.add(message[:160])

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)
            self.counts["problems"] += 1

    def code_for(self, user: int, conversation: str, rng: random.Random) -> str:
        with self.lock:
            while True:
                code = "K-" + "".join(rng.choice(ALPHABET) for _ in range(8))
                if code not in self.issued:
                    self.issued[code] = (user, conversation)
                    return code

    def check_codes(self, user: int, conversation: str, text: str) -> None:
        """Count own codes echoed and codes invented; an answer holding another user's code crossed over."""
        with self.lock:
            for code in CODE.findall(text):
                owner = self.issued.get(code)
                if owner is None:
                    self.counts["codes invented by the model"] += 1
                elif owner[0] == user:
                    self.counts["own codes echoed"] += 1
                else:
                    self.problems.append(f"user {user} ({conversation}) got {code} of user {owner[0]} ({owner[1]}) "
                                         f"in {text[:160]!r}")
                    self.counts["problems"] += 1


class SocketUser(threading.Thread):
    """One websocket user: a conversation of a few turns at a time, random stops and hang-ups (after which it
    comes back to the same conversation on a new socket), then a new conversation, as people do."""

    def __init__(self, index: int, base: str, run: str, deadline: float, tally: Tally, seed: int):
        super().__init__(name=f"ws-{index}", daemon=True)
        self.index, self.tally, self.deadline = index, tally, deadline
        self.rng = random.Random(seed * 1000 + index)
        self.personality = PERSONALITIES[index % len(PERSONALITIES)]
        self.url = f"{base.replace('http://', 'ws://')}/gpt-socket/{self.personality}?format=json"
        self.prefix, self.conversations, self.turns_left = f"soak-{run}-{index}", 0, 0
        self.session = ""
        self.ws = None
        self.first = True  # the first prompt on each socket names the conversation
        self.pending = False  # a prompt was sent and neither its end frame came nor did we hang up

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            try:
                if self.ws is None:
                    self.ws = websocket.create_connection(self.url, timeout=ANSWER_TIMEOUT)
                    self.first = True
                self.turn()
            except (OSError, websocket.WebSocketException) as exc:
                self.tally.error(f"ws transport: {type(exc).__name__}", str(exc))
                if self.pending:
                    self.tally.problem(f"user {self.index}: connection lost before the end frame ({exc!r})")
                    self.tally.add("lost")
                    self.pending = False
                self.hang_up(polite=False)
                time.sleep(1)
        self.hang_up(polite=True)

    def hang_up(self, polite: bool) -> None:
        if self.ws is not None:
            try:
                if polite:
                    self.ws.close(timeout=0.5)
            finally:
                self.ws.shutdown()
                self.ws = None

    def turn(self) -> None:
        """One prompt: send it, read to its end frame (or hang up / stop on purpose), check what came back."""
        if self.turns_left == 0:  # a new conversation, on a new socket
            self.conversations, self.turns_left = self.conversations + 1, self.rng.randint(3, 6)
            self.session = f"{self.prefix}-{self.conversations}"
            self.hang_up(polite=True)
            self.ws = websocket.create_connection(self.url, timeout=ANSWER_TIMEOUT)
            self.first = True
        self.turns_left -= 1
        self.expect_silence()
        code = self.tally.code_for(self.index, self.session, self.rng)
        prompt = f"{self.rng.choice(QUESTIONS)} Repeat the code {code}:"
        if self.first:
            prompt, self.first = f"|SESSION|{self.session}|/SESSION|{prompt}", False
        action = self.rng.choices(("answer", "stop", "hang up"), weights=(70, 15, 15))[0]
        after = self.rng.randrange(0 if action == "hang up" else 1, 6)  # tokens seen before stopping or hanging up
        started, first, tokens, text = time.monotonic(), None, 0, ""
        self.ws.send(prompt)
        self.tally.add("sent")
        self.pending = True
        while True:
            try:
                frame = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                self.tally.problem(f"user {self.index}: no end frame within {ANSWER_TIMEOUT:.0f} s (lost)")
                self.tally.add("lost")
                self.pending = False
                self.hang_up(polite=False)
                return
            kind = frame.get("type")
            if kind == "token":
                tokens, text = tokens + 1, text + frame.get("text", "")
                if first is None:
                    first = time.monotonic() - started
                    with self.tally.lock:
                        self.tally.ttft.append(first)
                if tokens >= after and action == "hang up":
                    self.tally.add("disconnected")
                    self.pending = False
                    self.hang_up(polite=self.rng.random() < 0.5)
                    return
                if tokens == after and action == "stop":
                    self.ws.send("|STOP|")
            elif kind == "error":
                self.tally.error(f"ws {frame.get('status')} {frame.get('error')}", frame.get("message", ""))
            elif kind == "end":
                self.pending = False
                self.ended(frame, text)
                return

    def ended(self, frame: dict, text: str) -> None:
        if frame.get("conversation") != self.session:
            self.tally.problem(f"user {self.index}: end frame for {frame.get('conversation')!r}, "
                               f"expected {self.session!r}")
        self.tally.check_codes(self.index, self.session, text)
        usage = frame.get("usage") or {}
        if usage.get("time_to_first_token") is not None:
            with self.tally.lock:
                self.tally.server_ttft.append(usage["time_to_first_token"])
        self.tally.add("stopped" if frame.get("finish_reason") == "cancelled" else
                       "completed" if frame.get("finish_reason") else "ended without an answer")

    def expect_silence(self) -> None:
        """Nothing may arrive between an end frame and the next prompt (a second end, a stray token)."""
        self.ws.settimeout(0.05)
        try:
            frame = self.ws.recv()
            self.tally.problem(f"user {self.index}: frame after END: {frame[:120]!r}")
        except websocket.WebSocketTimeoutException:
            pass
        finally:
            self.ws.settimeout(ANSWER_TIMEOUT)


class HttpUser(threading.Thread):
    """One HTTP user of ``/gpt/<personality>``: its own sessions, a new one every few requests; hangs up early
    now and then."""

    def __init__(self, index: int, base: str, run: str, deadline: float, tally: Tally, seed: int):
        super().__init__(name=f"http-{index}", daemon=True)
        self.index, self.base, self.tally, self.deadline = index + SOCKET_USERS, base, tally, deadline
        self.rng = random.Random(seed * 1000 + self.index)
        self.prefix, self.requests = f"soak-{run}-http-{index}", 0
        self.http = requests.Session()

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            self.ask()
        self.http.close()

    def ask(self) -> None:
        personality = self.rng.choice(PERSONALITIES)
        self.requests += 1
        session = f"{self.prefix}-{personality}-{self.requests // 8}"  # about four turns per conversation
        code = self.tally.code_for(self.index, session, self.rng)
        hang_up = self.rng.random() < 0.15
        params = {"prompt": f"{self.rng.choice(QUESTIONS)} Repeat the code {code}:", "session": session}
        self.tally.add("sent")
        try:
            response = self.http.get(f"{self.base}/gpt/{personality}", params=params,
                                     timeout=self.rng.uniform(0.2, 2.0) if hang_up else ANSWER_TIMEOUT)
        except requests.Timeout:
            self.tally.add("disconnected" if hang_up else "lost")
            if not hang_up:
                self.tally.problem(f"http user {self.index}: no answer within {ANSWER_TIMEOUT:.0f} s (lost)")
            return
        except requests.RequestException as exc:
            self.tally.error(f"http transport: {type(exc).__name__}", str(exc))
            self.tally.add("lost")
            time.sleep(1)
            return
        self.check(response, session)

    def check(self, response: requests.Response, session: str) -> None:
        if response.status_code != 200:
            try:
                kind, message = response.json()["error"]["type"], response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                kind, message = "not json", response.text[:160]
            self.tally.error(f"http {response.status_code} {kind}", message)
            self.tally.add("refused" if response.status_code == 503 else "failed")
            return
        if response.headers.get("X-Conversation") != session:
            self.tally.problem(f"http user {self.index}: X-Conversation {response.headers.get('X-Conversation')!r}")
        self.tally.check_codes(self.index, session, response.text)
        self.tally.add("stopped" if response.headers.get("X-Finish-Reason") == "cancelled" else "completed")


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Sample:
    """The server every 5 s: RSS and the engine's figures from /health."""

    at: float
    rss: int | None
    queue_depth: int | None = None
    active: int | None = None
    cache_used: int | None = None
    suspended: int | None = None
    step_age: float | None = None  # seconds since the scheduler's last step: a stall shows here


def watch(server: Server, stop: threading.Event, samples: list[Sample]) -> None:
    started = time.monotonic()
    while not stop.wait(5):
        try:
            engine = requests.get(server.base + "/health", timeout=5).json().get("engine", {})
            samples.append(Sample(time.monotonic() - started, rss_kib(server.process.pid), engine.get("queue_depth"),
                                  engine.get("active_sequences"), engine.get("cache_tokens_used"),
                                  engine.get("suspended_conversations"), engine.get("last_step_age")))
        except (requests.RequestException, ValueError, OSError):
            samples.append(Sample(time.monotonic() - started, None))


def warm_up(base: str) -> None:
    """Eight answers at once so every buffer the engine allocates under load exists before the baseline."""
    def one(index: int) -> None:
        ws = websocket.create_connection(f"{base.replace('http://', 'ws://')}/gpt-socket/soak?format=json",
                                         timeout=ANSWER_TIMEOUT)
        ws.send(f"|SESSION|warm-up-{index}|/SESSION|Say hello.")
        while json.loads(ws.recv())["type"] != "end":
            pass
        ws.close()

    threads = [threading.Thread(target=one, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def start_server(directory: Path, tokens: int) -> Server:
    for name in PERSONALITIES:
        (directory / f"{name}.toml").write_text(PERSONALITY.format(name=name, date=str(name != "soak").lower(),
                                                                   tokens=tokens))
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("LLM_API_KEYS", "LLM_LOG_TRANSCRIPTS")}
    # Small caches on purpose: eviction, suspend, restore and trimming run all the time, and the bounded
    # memory they use is all resident by the end of the warm-up, so later growth means a leak.
    env.update(HOST="127.0.0.1", PORT=str(port), LLM_PARALLEL="8", LLM_QUEUE_SIZE="64", LLM_CONTEXT_WINDOW="1024",
               LLM_CACHE_TOKENS="8192", LLM_SUSPEND_MB="128", LLM_PERSONALITIES_DIR=str(directory),
               LLM_DATA_DIR=str(directory),
               DATABASE_URL=f"sqlite:///{directory / 'soak.db'}")
    return Server("service", [sys.executable, "app.py"], env, port, "/health", start_timeout=300)


def percentile(values: list[float], point: float) -> float | None:
    """Nearest rank."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(point / 100 * len(ordered))) - 1]


def seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} s"


@dataclass
class Memory:
    """Resident memory (KiB): idle after start-up, after the load warm-up (the baseline), at the end."""

    idle: int
    loaded: int = 0
    end: int = 0

    @property
    def growth(self) -> float:
        return (self.end - self.loaded) / self.loaded


def server_errors(tally: Tally, log_text: str) -> int:
    """5xx answers other than 503 (overloaded), plus unhandled errors the server logged."""
    answered = sum(n for kind, n in tally.errors.items() if re.search(r" 5\d\d ", f" {kind} ") and " 503 " not in
                   f" {kind} ")
    return answered + log_text.count("unhandled error (incident")


def summary(args, tally: Tally, memory: Memory, samples: list[Sample], elapsed: float, log_text: str) -> bool:
    """Print the Markdown report; True when the run passes."""
    counts = tally.counts
    checks = [("every prompt got one end frame or was abandoned on purpose", counts["lost"] == 0),
              ("no answer mixed up, no frame after END", not tally.problems),
              ("no 5xx but 503 (overloaded)", server_errors(tally, log_text) == 0),
              ("resident memory grew < 10% after the load warm-up", memory.growth < 0.10)]
    print(f"\n## Soak test: {elapsed:.0f} s ({args.warm_up:.0f} s warm-up under load, {args.duration:.0f} s measured, "
          f"then draining), {SOCKET_USERS} websocket + {HTTP_USERS} HTTP users\n")
    print(f"LLM_PARALLEL=8, LLM_QUEUE_SIZE=64, LLM_CONTEXT_WINDOW=1024, LLM_CACHE_TOKENS=8192, LLM_SUSPEND_MB=128, "
          f"max_tokens={args.tokens}, seed {args.seed}.\n")
    print("| Figure | Value |\n|---|---|")
    for name in ("sent", "completed", "stopped", "disconnected", "refused", "failed", "lost"):
        print(f"| prompts {name} | {counts[name]} |")
    print(f"| codes in answers: own echoed / invented by the model | {counts['own codes echoed']} / "
          f"{counts['codes invented by the model']} |")
    print(f"| time to first token, client, p50 / p95 | {seconds(percentile(tally.ttft, 50))} / "
          f"{seconds(percentile(tally.ttft, 95))} ({len(tally.ttft)} answers, queueing included) |")
    print(f"| time to first token, server, p50 / p95 / max | {seconds(percentile(tally.server_ttft, 50))} / "
          f"{seconds(percentile(tally.server_ttft, 95))} / {seconds(max(tally.server_ttft, default=None))} |")
    print(f"| resident memory: idle / after warm-up / end | {memory.idle >> 10} / {memory.loaded >> 10} / "
          f"{memory.end >> 10} MiB ({memory.growth:+.1%} after warm-up) |")
    queue = [sample.queue_depth for sample in samples if sample.queue_depth is not None]
    print(f"| queue depth, highest sample | {max(queue) if queue else '–'} |")
    stalls = [s.step_age for s in samples if s.step_age is not None and (s.queue_depth or s.active)]
    print(f"| longest scheduler stall seen with work waiting | {seconds(max(stalls) if stalls else None)} |")
    print(f"| machine load average (1 min) at start / end | {args.load[0]:.1f} / {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs |")
    print(f"| 5xx other than 503, unhandled errors logged | {server_errors(tally, log_text)} |")
    print("\n| Errors by kind | Count | Messages |\n|---|---|---|")
    for kind, n in sorted(tally.errors.items()) or [("none", 0)]:
        print(f"| {kind} | {n} | {'; '.join(sorted(tally.messages.get(kind, ())))} |")
    print("\nEvery 5 s, RSS MiB / KV cache cells used / suspended conversations / queue depth:")
    print(" ".join(f"{s.rss >> 10}/{s.cache_used}/{s.suspended}/{s.queue_depth}" for s in samples if s.rss))
    for problem in tally.problems[:20]:
        print(f"- problem: {problem}")
    print("\n| Check | Result |\n|---|---|")
    for name, ok in checks:
        print(f"| {name} | {'pass' if ok else '**FAIL**'} |")
    return all(ok for _, ok in checks)


def soak(args, server: Server, tally: Tally, samples: list[Sample]) -> tuple[Memory, float]:
    """Users from start to deadline; the memory baseline is taken once the load warm-up is over."""
    warm_up(server.base)
    memory = Memory(idle=rss_kib(server.process.pid))
    started, run = time.monotonic(), f"{int(time.time())}"
    deadline = started + args.warm_up + args.duration
    users = [SocketUser(i, server.base, run, deadline, tally, args.seed) for i in range(SOCKET_USERS)]
    users += [HttpUser(i, server.base, run, deadline, tally, args.seed) for i in range(HTTP_USERS)]
    stop = threading.Event()
    threading.Thread(target=watch, args=(server, stop, samples), daemon=True).start()
    for user in users:
        user.start()
    time.sleep(args.warm_up)
    memory.loaded = rss_kib(server.process.pid)
    for user in users:
        user.join(timeout=max(0.0, deadline + DRAIN - time.monotonic()))
    stuck = [user.name for user in users if user.is_alive()]
    if stuck:
        tally.problem(f"users still waiting {DRAIN:.0f} s after the deadline: {', '.join(stuck)}")
        tally.add("lost", len(stuck))
    stop.set()
    memory.end = rss_kib(server.process.pid)
    return memory, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="measured time (default 300)")
    parser.add_argument("--quick", action="store_true", help="a 30-second smoke run")
    parser.add_argument("--warm-up", type=float, default=60.0,
                        help="seconds under full load before the memory baseline (default 60)")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of the soak personalities")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    args.duration = 30.0 if args.quick else args.seconds
    args.load = os.getloadavg()
    tally, samples = Tally(), []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp, start_server(Path(tmp), args.tokens) as server:
        memory, elapsed = soak(args, server, tally, samples)
        log_text = Path(server.log.name).read_text(errors="replace")
    passed = summary(args, tally, memory, samples, elapsed, log_text)
    if not passed:
        kept = Path(tempfile.gettempdir()) / f"soak-server-{int(time.time())}.log"
        kept.write_text(log_text)
        print(f"\nServer log kept in {kept}; last lines:\n```\n" + "\n".join(log_text.splitlines()[-20:]) + "\n```")
    print(f"\nResult: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
