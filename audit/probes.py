"""Multi-user safety probes: plain HTTP and websocket clients against a running service on 127.0.0.1.

Each probe returns rows of (probe, expected, observed, passed). ``make audit`` (``audit/run.py``) runs them
against real servers and prints the table; ``tests/test_audit.py`` runs the same probes as tests. The service
under test is started with ``LLM_API_KEYS=alice:k1,bob:k2`` plus the extra users ``AUDIT_USERS`` (for the
connection-capacity probe). Nothing here connects anywhere but the target's loopback address and other
loopback source addresses (the whole of 127.0.0.0/8 is this machine).
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
import websocket

ALICE, BOB = {"X-API-Key": "k1"}, {"X-API-Key": "k2"}
AUDIT_USERS = [(f"u{index}", f"uk{index}") for index in range(8)]
KEYS = "alice:k1,bob:k2," + ",".join(f"{user}:{key}" for user, key in AUDIT_USERS)
EVIL = "^((a+)+b|a*!)$"
BAIT = "a" * 30 + "!"


@dataclass
class Row:
    probe: str
    expected: str
    observed: str
    passed: bool


class Target:
    """A running service: its URL, one personality to talk to, and its settings that probes depend on."""

    def __init__(self, url: str, personality: str, header_timeout: float = 10.0, sockets_per_user: int = 32,
                 connections_per_address: int = 256):
        self.url, self.personality = url.rstrip("/"), personality
        self.host, self.port = urlsplit(url).hostname, urlsplit(url).port
        self.ws_url = "ws" + self.url[4:]
        self.header_timeout = header_timeout
        self.sockets_per_user = sockets_per_user
        self.connections_per_address = connections_per_address

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 120), **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=kwargs.pop("timeout", 300), **kwargs)

    def socket(self, headers: dict | None = None, source: str | None = None, query: str = "",
               timeout: float = 300, origin: str | None = None) -> websocket.WebSocket:
        # Connecting from another loopback address (127.0.0.0/8 is all this machine) stands for another client.
        raw = socket.create_connection((self.host, self.port), timeout=timeout, source_address=(source, 0)) \
            if source else None
        options = {"socket": raw} if raw else {}
        if origin:
            options["origin"] = origin
        lines = [f"{name}: {value}" for name, value in (headers or {}).items()]
        try:
            return websocket.create_connection(f"{self.ws_url}/gpt-socket/{self.personality}{query}",
                                               timeout=timeout, header=lines, **options)
        except Exception:
            if raw is not None:  # a refused handshake leaves the socket we made to us
                raw.close()
            raise


def _health_latencies(target: Target, stop: threading.Event, found: list[float]) -> None:
    """Ask /health every 100 ms until told to stop, recording each answer's latency (inf on failure)."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            ok = requests.get(target.url + "/health", timeout=10).status_code in (200, 503)
        except requests.RequestException:
            ok = False
        found.append(time.monotonic() - started if ok else float("inf"))
        stop.wait(0.1)


def while_watching_health(target: Target, action: Callable[[], object]) -> tuple[object, float]:
    """Run ``action`` while /health is polled; returns its result and the worst /health latency seen."""
    stop, latencies = threading.Event(), []
    watcher = threading.Thread(target=_health_latencies, args=(target, stop, latencies), daemon=True)
    watcher.start()
    try:
        result = action()
    finally:
        stop.set()
        watcher.join(15)
    return result, max(latencies) if latencies else float("inf")


# ----- 1. client regexes run in bounded time ------------------------------------------------------------------

def redos(target: Target) -> Iterator[Row]:
    """Nested-quantifier patterns in /toil and /v1 answers are checked in linear time; lookaround is a 422."""
    schemas = {
        "pattern (/toil)": {"type": "string", "const": BAIT, "pattern": EVIL},
        "patternProperties (/toil)": {"type": "object", "properties": {BAIT: {"const": 1}}, "required": [BAIT],
                                      "patternProperties": {EVIL: {"type": "integer"}}},
    }
    for name, schema in schemas.items():
        def ask(schema=schema):
            started = time.monotonic()
            response = target.post(f"/toil/{target.personality}", headers=ALICE,
                                   json={"prompt": "Answer.", "schema": schema})
            return response.status_code, time.monotonic() - started

        (status, took), worst = while_watching_health(target, ask)
        yield Row(f"ReDoS {name}", "answered (200/422); /health < 1 s",
                  f"{status} in {took:.1f} s; /health worst {worst:.2f} s", status in (200, 422) and worst < 1.0)

    def ask_v1():
        body = {"model": target.personality, "messages": [{"role": "user", "content": "Answer."}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schemas[
                    "pattern (/toil)"]}}}
        return target.post("/v1/chat/completions", headers=ALICE, json=body).status_code

    status, worst = while_watching_health(target, ask_v1)
    yield Row("ReDoS pattern (/v1 response_format)", "answered; /health < 1 s", f"{status}; /health worst "
              f"{worst:.2f} s", status in (200, 422) and worst < 1.0)
    for pattern in ("^(a)\\1$", "^(?=a).*$"):
        status = target.post(f"/toil/{target.personality}", headers=ALICE, json={
            "prompt": "x", "schema": {"type": "string", "pattern": pattern}}).status_code
        yield Row(f"pattern {pattern} (backreference/lookaround)", "422 before generation", str(status),
                  status == 422)


# ----- 2. connections: idle websockets, half-sent requests, caps ----------------------------------------------

def _half_open(target: Target, source: str) -> socket.socket:
    sock = socket.create_connection((target.host, target.port), timeout=30, source_address=(source, 0))
    sock.sendall(b"GET /health HT")  # half a request line, never finished (slowloris)
    return sock


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _first_token(target: Target, headers: dict) -> float:
    started = time.monotonic()
    ws = target.socket(headers, query="?format=json")
    try:
        ws.send("Say hello.")
        while True:
            frame = json.loads(ws.recv())
            if frame["type"] in ("token", "end", "error"):
                return time.monotonic() - started if frame["type"] != "error" else float("inf")
    finally:
        ws.close()


def connections(target: Target, idle_sockets: int = 200, half_open: int = 100) -> Iterator[Row]:
    """Idle websockets and slowloris connections from several loopback addresses leave the service answering."""
    opened: list = []
    try:
        users = AUDIT_USERS
        for index in range(idle_sockets):
            user, key = users[index % len(users)]
            opened.append(target.socket({"X-API-Key": key}, source=f"127.0.0.{2 + index % 5}"))
        for index in range(half_open):
            opened.append(_half_open(target, f"127.0.0.{10 + index % 2}"))
        health = []
        for _ in range(5):
            started = time.monotonic()
            status = target.get("/health", timeout=10).status_code
            health.append(time.monotonic() - started if status in (200, 503) else float("inf"))
        yield Row(f"/health with {idle_sockets} idle websockets + {half_open} half-open connections",
                  "< 1 s", f"worst {max(health):.3f} s, median {statistics.median(health):.3f} s", max(health) < 1)
        first = _first_token(target, BOB)
        yield Row("a new user's answer streams meanwhile", "first token arrives",
                  f"first token after {first:.1f} s", first != float("inf"))
        slow = _half_open(target, "127.0.0.12")
        closed = _closed_by_server(slow, target.header_timeout + 10)
        slow.close()
        yield Row("half-sent request headers", f"closed after ~{target.header_timeout:g} s",
                  "closed" if closed else "still open", closed)
    finally:
        for item in opened:
            try:
                item.close()
            except Exception:  # noqa: BLE001 - the server may have closed it first
                pass
    yield from caps(target)


def caps(target: Target) -> Iterator[Row]:
    """One user cannot hold more than LLM_MAX_SOCKETS_PER_USER sockets; one address not more connections."""
    held = []
    try:
        for _ in range(target.sockets_per_user):
            held.append(target.socket(ALICE, source="127.0.0.30"))
        try:
            target.socket(ALICE, source="127.0.0.31").close()
            observed = "accepted"
        except websocket.WebSocketBadStatusException as exc:
            observed = str(exc.status_code)
        yield Row(f"websocket {target.sockets_per_user + 1} of one user", "429", observed, observed == "429")
    finally:
        for ws in held:
            ws.close()
    conns = []
    try:
        for _ in range(target.connections_per_address + 5):
            conns.append(socket.create_connection((target.host, target.port), timeout=10,
                                                  source_address=("127.0.0.40", 0)))
        refused = sum(_closed_by_server(conn, 2) for conn in conns[-5:])
        yield Row(f"connections beyond {target.connections_per_address} from one address", "closed at once",
                  f"{refused} of 5 closed", refused == 5)
    finally:
        for conn in conns:
            conn.close()


# ----- 3. and 4. the engine: cached prefixes and special tokens ----------------------------------------------

def _chat(target: Target, headers: dict, content: str, max_tokens: int = 4) -> dict:
    return target.post("/v1/chat/completions", headers=headers, json={
        "model": target.personality, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "temperature": 0}).json()


def cache_isolation(target: Target) -> Iterator[Row]:
    """Bob's private text never shortens another user's prefill, whatever they guess.

    Each guess follows bob's secret at once (while his text is still cached) and is compared with the same
    user's cached count for an unrelated question asked right after an unrelated one of bob's: only the public
    prefix (system prompt, turn opener) may be reused across users."""
    secret = f"My bank PIN is 4729 and my account is {uuid.uuid4().hex[:6]}. Remember it."
    public = None
    for (_, key), guess in zip(AUDIT_USERS, (secret.replace("4729", "1111"), secret.replace("4729", "4711"), secret),
                               strict=False):
        headers = {"X-API-Key": key}
        _chat(target, BOB, "Tell me about the sea.")
        control = _chat(target, headers, "Tell me about the moon.")["usage"]["prompt_tokens_details"]["cached_tokens"]
        _chat(target, BOB, secret)
        cached = _chat(target, headers, guess)["usage"]["prompt_tokens_details"]["cached_tokens"]
        public = control if public is None else public
        yield Row(f"another user guesses bob's text ({guess[15:19]}...)",
                  f"cached_tokens = {control} (as for an unrelated question)", str(cached), cached == control)
    _chat(target, BOB, secret)
    mine = _chat(target, BOB, secret)["usage"]["prompt_tokens_details"]["cached_tokens"]
    yield Row("bob repeats his own text", f"cached_tokens > {public} (his own prefix is reused)", str(mine),
              public is not None and mine > public)


def special_tokens(target: Target) -> Iterator[Row]:
    """A turn marker typed by a user costs several plain-text tokens, never the one control token."""
    plain = _chat(target, ALICE, "Hello there")["usage"]["prompt_tokens"]
    for marker in ("<|im_end|>", "<|im_start|>", "<end_of_turn>", "<|eot_id|>"):
        typed = _chat(target, ALICE, f"Hello{marker} there")["usage"]["prompt_tokens"]
        yield Row(f"user types {marker}", "tokenized as text (> 1 extra token)", f"+{typed - plain} tokens",
                  typed - plain > 1)


# ----- 5. to 10. keys, rate limits, hosts and origins, ids, storage --------------------------------------------

def keys_out_of_urls(target: Target) -> Iterator[Row]:
    status = target.get("/conversations?api_key=k1").status_code
    yield Row("key in a URL (?api_key=)", "401 (keys only in headers or the cookie)", str(status), status == 401)
    with requests.Session() as session:
        login = session.post(target.url + "/auth/session", json={"api_key": "k1"}, timeout=30)
        status = session.get(target.url + "/conversations", timeout=30).status_code
    cookie = login.headers.get("Set-Cookie", "")
    flags = all(flag in cookie for flag in ("HttpOnly", "SameSite=Strict"))
    yield Row("browser login", "HttpOnly SameSite=Strict cookie", cookie.split(";", 1)[-1].strip() or "none",
              login.status_code == 200 and flags)
    yield Row("cookie authenticates requests", "200", str(status), status == 200)


def _status_from(target: Target, source: str, path: str, headers: dict) -> int:
    """One GET from another loopback address (another client, with its own failure count)."""
    connection = http.client.HTTPConnection(target.host, target.port, timeout=30, source_address=(source, 0))
    try:
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def wrong_keys_throttled(target: Target, limit: int = 10) -> Iterator[Row]:
    source = f"127.0.0.{50 + uuid.uuid4().int % 100}"
    statuses = [_status_from(target, source, "/conversations", {"X-API-Key": f"guess-{i}"}) for i in range(limit + 2)]
    yield Row(f"{limit + 2} wrong keys from one address", f"401 x {limit}, then 429",
              " ".join(map(str, statuses)), statuses[:limit] == [401] * limit and statuses[-1] == 429)


def rate_budget(target: Target, limit: int, headers: Callable[[int], dict]) -> Iterator[Row]:
    """One budget per user (address when anonymous) across HTTP and websocket prompts."""
    statuses = []
    for index in range(limit // 2):
        statuses.append(target.get(f"/gpt/{target.personality}?prompt=hi", headers=headers(index)).status_code)
    ws = target.socket(headers(99))
    try:
        for _ in range(limit - limit // 2 + 1):
            ws.send("hi")
            frames = []
            while not frames or not frames[-1].startswith("<END"):
                frames.append(ws.recv())
            statuses.append(429 if any("Rate limit" in frame for frame in frames) else 200)
    finally:
        ws.close()
    yield Row(f"{limit + 1} requests (HTTP then websocket prompts), budget {limit}",
              f"{limit} answered, then 429", " ".join(map(str, statuses)),
              statuses[:limit] == [200] * limit and statuses[-1] == 429)


def hosts_and_origins(target: Target) -> Iterator[Row]:
    status = target.get("/conversations", headers={**ALICE, "Host": "attacker.example"}).status_code
    yield Row("Host: attacker.example (DNS rebinding)", "400", str(status), status == 400)
    try:
        target.socket(ALICE, origin="http://attacker.example").close()
        observed = "accepted"
    except websocket.WebSocketBadStatusException as exc:
        observed = str(exc.status_code)
    yield Row("websocket from Origin attacker.example", "403", observed, observed == "403")
    status = target.post(f"/gpt/{target.personality}", headers={**ALICE, "Origin": "http://attacker.example"},
                         data={"prompt": "hi"}).status_code
    yield Row("cross-site POST", "403", str(status), status == 403)
    page = target.get("/")
    wanted = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options")
    missing = [name for name in wanted if name not in page.headers]
    framing = "frame-ancestors 'none'" in page.headers.get("Content-Security-Policy", "")
    yield Row("security headers on the page", "CSP (frame-ancestors), X-Frame-Options, nosniff",
              "missing " + ", ".join(missing) if missing else "all present", not missing and framing)


def conversation_ids(target: Target) -> Iterator[Row]:
    for bad in ("жж", "a/b", "x" * 200, "../etc"):
        started = time.monotonic()
        status = target.get(f"/gpt/{target.personality}", headers=ALICE, params={"prompt": "hi", "session": bad},
                            timeout=30).status_code
        yield Row(f"session id {bad[:12]!r}", "400 at once", f"{status} in {time.monotonic() - started:.2f} s",
                  status == 400)
    shared = f"shared-{uuid.uuid4().hex[:8]}"
    target.get(f"/gpt/{target.personality}", headers=ALICE, params={"prompt": "alice's secret", "session": shared})
    looked = target.get(f"/conversations/{shared}", headers=BOB).status_code
    used = target.get(f"/gpt/{target.personality}", headers=BOB, params={"prompt": "bob here", "session": shared})
    alices = target.get(f"/conversations/{shared}", headers=ALICE).json()
    intact = [turn["content"] for turn in alices["turns"] if turn["role"] == "user"] == ["alice's secret"]
    yield Row("bob reads alice's conversation id", "404 (as unknown)", str(looked), looked == 404)
    yield Row("bob uses alice's id", "200, his own conversation; hers intact",
              f"{used.status_code}; hers {'intact' if intact else 'CHANGED'}", used.status_code == 200 and intact)


def storage_growth(target: Target) -> Iterator[Row]:
    before = len(target.get("/conversations?limit=100", headers=BOB).json()["conversations"])
    ids = [f"big-{uuid.uuid4().hex[:8]}" for _ in range(20)]
    statuses = {target.post(f"/gpt/{target.personality}", headers=BOB, json={"prompt": "word " * 20000,
                                                                           "session": cid}).status_code
                for cid in ids}
    after = len(target.get("/conversations?limit=100", headers=BOB).json()["conversations"])
    missing = sum(target.get(f"/conversations/{cid}", headers=BOB).status_code == 404 for cid in ids)
    yield Row("20 refused prompts with new session ids", "413s; no conversation rows",
              f"{sorted(statuses)}; {after - before} new, {missing}/20 unknown",
              statuses <= {400, 413} and after == before and missing == 20)




def trickled_body(target: Target) -> Iterator[Row]:
    """A request body sent a byte at a time, slower than the header timeout, is cut off instead of holding on."""
    sock = socket.create_connection((target.host, target.port), timeout=60)
    try:
        sock.sendall(f"POST /gpt/{target.personality} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                     "X-API-Key: k1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
        started, answered = time.monotonic(), b""
        sock.settimeout(target.header_timeout * 3 + 10)
        try:
            answered = sock.recv(1024)
        except TimeoutError:
            pass
        took = time.monotonic() - started
    finally:
        sock.close()
    yield Row("request body that stops arriving", f"answered or closed within ~{target.header_timeout:g} s",
              f"{answered[:12]!r} after {took:.1f} s", took < target.header_timeout * 3 + 5)
