"""Hostile input at every endpoint: the answer is a 4xx in the right error shape or a normal 200, never a 5xx,
and the service still answers a normal request afterwards.

HTTP goes through Flask's test client on the fake engine; websockets through websocket-client against a real
server on 127.0.0.1. Examples are bounded (size and count) so the whole file runs in well under a minute.
"""

from __future__ import annotations

import json
import struct
import time
from urllib.parse import quote

import pytest
import websocket
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llm.web.observability import install_observability

FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
PERSONALITIES = ("greedy", "other", "structured")
SPECIAL = ("", " ", "\x00", "\u202eevil\u202c", "\u200f\u05e9\u05dc\u05d5\u05dd", "😀👩‍👩‍👧", "\ufeff", "\u2028",
           "|SESSION|", "|/SESSION|", "|STOP|", "<END>", "<ERROR>", "|CONTEXT|x|/CONTEXT|", "../../etc/passwd",
           "%00", "<script>alert(1)</script>", "' OR 1=1 --", "{{7*7}}", "\\", "\r\n", "a" * 129)
HUGE = ("x" * 210_000, "word " * 45_000, "é" * 100_000)  # beyond MAX_PROMPT_CHARS, or just under it

# Text as a client can put it in a URL or a form (UTF-8 encodable), and as JSON can carry it (lone surrogates
# are legal escaped in JSON: "\ud800").
plain_text = st.one_of(st.text(max_size=60), st.sampled_from(SPECIAL + HUGE))
surrogates = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), min_size=1, max_size=20)
json_text = st.one_of(plain_text, surrogates)
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), json_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(json_text, inner, max_size=4)),
                           max_leaves=12)
personality = st.one_of(st.sampled_from(PERSONALITIES), plain_text)
content_types = st.sampled_from(["application/json", "application/json; charset=latin-1", "text/plain",
                                 "application/x-www-form-urlencoded", "multipart/form-data", "application/xml",
                                 "application/json; charset=utf-16", "", "garbage/!!"])
raw_bodies = st.one_of(st.binary(max_size=200), st.sampled_from([b"{", b"[]", b"null", b'{"prompt": "\xff\xfe"}',
                                                                 b'{"prompt": "\\ud800"}', b"\x00" * 10,
                                                                 b'{"a":' * 200 + b"1" + b"}" * 200,
                                                                 b"[" * 100_000 + b"]" * 100_000]))


@pytest.fixture
def app(make_app):
    """The fake-engine app with observability, so its hooks and /metrics, /stats.json face the same input."""
    app = make_app()
    if "observability" not in app.extensions:  # until create_app installs it
        install_observability(app)
    return app


def dumps(value) -> bytes:
    """JSON as a hostile client may send it: NaN, Infinity and escaped lone surrogates included."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()


def segment(text: str) -> str:
    """A path segment from arbitrary text (encoded, so the URL stays a URL)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="") or "x"


def model_failed(response) -> bool:
    """A 500 generation_failed: the answer did not match the schema. The fake engine ignores schemas (on the
    real engine decoding is constrained to them), so with a schema in the request this one is the fake's."""
    error = (response.get_json(silent=True) or {}).get("error") or {}
    return response.status_code == 500 and "generation_failed" in (error.get("type"), error.get("code"))


def check(response, path: str, *, schema_sent: bool = False) -> None:
    """A 2xx answer or a 4xx in the endpoint's error shape; never a 5xx."""
    status, body = response.status_code, response.get_data()
    if schema_sent and model_failed(response):
        return
    assert status < 500, f"{response.request.method} {path} -> {status}: {body[:600]!r}"
    if status < 400 or response.request.method == "HEAD":
        return
    error = json.loads(body)["error"]
    if path.startswith("/v1/"):
        assert set(error) == {"message", "type", "param", "code"}, error
    else:
        assert set(error) == {"message", "type", "status"} and error["status"] == status, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)


def still_answers(client) -> None:
    response = client.get("/gpt/greedy", query_string={"prompt": "Hi"})
    assert response.status_code == 200 and response.get_data(as_text=True) == "Hello from the fake engine."


# ----- HTTP --------------------------------------------------------------------------------------------------

@FUZZ
@given(name=personality, params=st.dictionaries(st.sampled_from(["prompt", "session", "api_key", "format", "x"]),
                                                plain_text, max_size=4))
def test_gpt_get(client, name, params):
    path = f"/gpt/{segment(name)}"
    check(client.get(path, query_string=params), path)
    still_answers(client)


@FUZZ
@given(name=personality, form=st.dictionaries(st.sampled_from(["prompt", "session", "other"]), plain_text,
                                              max_size=3))
def test_gpt_post_form(client, name, form):
    path = f"/gpt/{segment(name)}"
    check(client.post(path, data=form), path)
    still_answers(client)


sessions = st.one_of(st.sampled_from(["fuzz-session", "other-session"]), json_values)


@FUZZ
@given(name=personality, body=st.one_of(json_values, st.fixed_dictionaries(
    {"prompt": st.one_of(json_text, json_values)}, optional={"session": sessions, "extra": json_values})))
@example(name="greedy", body={"prompt": "hi \ud800", "session": "fuzz-session"})  # lone surrogate, stored
def test_gpt_post_json(client, name, body):
    path = f"/gpt/{segment(name)}"
    check(client.post(path, data=dumps(body), content_type="application/json"), path)
    still_answers(client)


@FUZZ
@given(path=st.sampled_from(["/gpt/greedy", "/toil/structured", "/v1/chat/completions", "/v1/completions",
                             "/v1/embeddings", "/conversations/x", "/personalities"]),
       body=raw_bodies, content_type=content_types)
@example(path="/gpt/greedy", body=b"[" * 100_000 + b"]" * 100_000, content_type="application/json")  # too deep
def test_raw_bodies_and_content_types(client, path, body, content_type):
    check(client.post(path, data=body, content_type=content_type), path)
    still_answers(client)


schema_keywords = {"properties": st.dictionaries(json_text, st.just({"type": "string"}), max_size=3),
                   "enum": st.lists(json_text, max_size=3), "pattern": json_text,
                   "required": st.lists(json_text, max_size=2)}
schemas = st.one_of(json_values, st.fixed_dictionaries(
    {"type": st.sampled_from(["object", "string", "array"])}, optional=schema_keywords))


@FUZZ
@given(name=personality, body=st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(json_text, json_values), "schema": schemas, "text": st.one_of(json_text, json_values),
    "session": sessions, "unknown": json_values})))
@example(name="structured", body={"prompt": "hi", "schema": {"type": "object", "properties": {"\ud800": {}}}})
@example(name="structured", body={"prompt": "hi \udfff", "session": "fuzz-session"})
def test_toil(client, name, body):
    path = f"/toil/{segment(name)}"
    schema_sent = isinstance(body, dict) and body.get("schema") is not None
    check(client.post(path, data=dumps(body), content_type="application/json"), path, schema_sent=schema_sent)
    still_answers(client)


messages = st.one_of(json_values, st.lists(st.one_of(json_values, st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "developer", "tool"]), json_values),
     "content": st.one_of(json_text, json_values, st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url"]), "text": json_values}), max_size=3))})), max_size=4))
openai_options = {"model": st.one_of(st.sampled_from(PERSONALITIES), json_values), "stream": json_values,
                  "temperature": scalars, "top_p": scalars, "max_tokens": scalars, "max_completion_tokens": scalars,
                  "seed": scalars, "stop": json_values, "n": scalars, "presence_penalty": scalars,
                  "frequency_penalty": scalars, "stream_options": json_values, "user": json_values,
                  "response_format": st.one_of(json_values, st.fixed_dictionaries(
                      {"type": st.sampled_from(["text", "json_object", "json_schema"])},
                      optional={"json_schema": st.fixed_dictionaries({}, optional={"schema": schemas})}))}


def drain(response) -> None:
    """Read a streamed answer to its end; every event is JSON or [DONE]."""
    body = response.get_data(as_text=True)
    if response.mimetype == "text/event-stream":
        events = [line[6:] for line in body.split("\n\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", body[-300:]
        for event in events[:-1]:
            json.loads(event)


@FUZZ
@given(body=st.one_of(json_values, st.fixed_dictionaries({"messages": messages}, optional=openai_options)))
@example(body={"model": "greedy", "messages": [{"role": "user", "content": "hi"}],
               "response_format": {"type": "json_schema", "json_schema": {"schema": {"enum": ["\ud800"]}}}})
def test_openai_chat_completions(client, body):
    response = client.post("/v1/chat/completions", data=dumps(body), content_type="application/json")
    drain(response)
    check(response, "/v1/chat/completions", schema_sent=isinstance(body, dict) and "response_format" in body)
    still_answers(client)


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/embeddings"]), body=st.one_of(json_values, st.fixed_dictionaries(
    {"prompt": st.one_of(json_text, json_values, st.lists(json_text, max_size=2))}, optional={
        **openai_options, "input": json_values})))
def test_openai_completions_and_embeddings(client, path, body):
    response = client.post(path, data=dumps(body), content_type="application/json")
    drain(response)
    check(response, path)
    still_answers(client)


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.one_of(st.sampled_from(["/", "/personalities", "/health", "/v1/models", "/stats.json", "/metrics",
                                       "/conversations", "/feedback/export"]),
                      st.builds(lambda a, b: f"/{a}/{b}", st.sampled_from(
                          ["gpt", "toil", "conversations", "v1/models", "v1", "static", "gpt-socket"]),
                          plain_text.map(segment))),
       query=st.dictionaries(st.sampled_from(["limit", "offset", "format", "prompt", "q"]), plain_text, max_size=2))
def test_any_method_any_path(client, method, path, query):
    response = client.open(path, method=method, query_string=query)
    check(response, path)
    response.close()
    still_answers(client)


@pytest.fixture
def conversation(client) -> tuple[str, int]:
    """A stored conversation and its answer's message id, so the routes get past 'not found'."""
    response = client.post("/gpt/greedy", data={"prompt": "Hi", "session": "fuzz-conversation"})
    return "fuzz-conversation", int(response.headers["X-Message-Id"])


feedback_bodies = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "rating": st.one_of(st.sampled_from(["up", "down", 1, -1]), json_values), "comment": json_values,
    "title": st.one_of(json_text, json_values)}))


@FUZZ
@given(ident=st.one_of(st.just("fuzz-conversation"), plain_text),
       message=st.one_of(st.just(None), st.integers(min_value=0, max_value=2**80)),
       method=st.sampled_from(["GET", "DELETE", "PATCH", "POST"]),
       suffix=st.sampled_from(["", "/export", "/export?format=json", "/export?format=pdf", "/feedback"]),
       body=feedback_bodies)
@example(ident="fuzz-conversation", message=None, method="PATCH", suffix="", body={"title": "t\ud800"})
@example(ident="fuzz-conversation", message=2**63, method="POST", suffix="/feedback", body={"rating": "up"})
@example(ident="fuzz-conversation", message=None, method="POST", suffix="/feedback", body={"rating": []})
def test_conversation_routes(client, conversation, ident, message, method, suffix, body):
    if suffix == "/feedback":
        message = conversation[1] if message is None else message
        path = f"/conversations/{segment(ident)}/messages/{message}/feedback"
    else:
        path = f"/conversations/{segment(ident)}{suffix}"
    check(client.open(path, method=method, data=dumps(body), content_type="application/json"), path.split("?")[0])
    still_answers(client)


def test_body_over_the_size_limit_is_a_413(client):
    for path in ("/gpt/greedy", "/v1/chat/completions", "/toil/structured"):
        response = client.post(path, data=b"{" + b" " * (5 << 20) + b"}", content_type="application/json")
        assert response.status_code == 413
        check(response, path)
    still_answers(client)


# ----- websocket ---------------------------------------------------------------------------------------------

def connect(server, query: str = "", personality: str = "greedy"):
    return websocket.create_connection(f"{server.ws_url}/gpt-socket/{personality}{query}", timeout=10)


def hang_up(ws) -> None:
    """Close politely, then the TCP socket too (close() skips it once the server has sent its close frame)."""
    ws.close(timeout=1)
    ws.shutdown()


def fresh_socket_works(server) -> None:
    ws = connect(server)
    try:
        ws.send("Hi")
        frames = []
        while not frames or frames[-1] != "<END>":
            frames.append(ws.recv())
        assert "".join(frames[:-1]) == "Hello from the fake engine."
    finally:
        hang_up(ws)


def read_ends(ws, expected: int, json_mode: bool) -> list:
    """Frames until ``expected`` end frames have arrived; each frame checked for its mode's shape."""
    frames, ends = [], 0
    while ends < expected:
        frame = ws.recv()
        assert isinstance(frame, str), frame
        if json_mode:
            frame = json.loads(frame)
            assert frame["type"] in ("start", "token", "status", "source", "error", "end"), frame
            ends += frame["type"] == "end"
        else:
            ends += frame == "<END>"
        frames.append(frame)
    return frames


ws_frame = st.one_of(plain_text.filter(lambda text: len(text) < 1000), st.just("|STOP|"),
                     st.builds(lambda ident, rest: f"|SESSION|{ident}|/SESSION|{rest}",
                               st.one_of(st.text(max_size=20), st.just("s" * 5000), st.just("|SESSION|a")),
                               st.text(max_size=20)),
                     st.binary(max_size=64), st.sampled_from(HUGE))


@FUZZ
@given(frames=st.lists(ws_frame, min_size=1, max_size=6), json_mode=st.booleans())
def test_socket_frames(live_fake, frames, json_mode):
    ws = connect(live_fake, "?format=json" if json_mode else "")
    try:
        for frame in frames:
            ws.send_binary(frame) if isinstance(frame, bytes) else ws.send(frame)
        received = read_ends(ws, sum(frame != "|STOP|" for frame in frames), json_mode)
    finally:
        hang_up(ws)
    ends = [f for f in received if (f["type"] == "end" if json_mode else f == "<END>")]
    assert len(ends) == sum(frame != "|STOP|" for frame in frames)
    for index, frame in enumerate(received):  # every error is followed by its end frame
        if (frame["type"] == "error") if json_mode else frame.startswith("<ERROR>"):
            following = received[index + 1]
            assert (following["type"] == "end") if json_mode else following == "<END>", received
    fresh_socket_works(live_fake)


def test_stop_storm(live_fake, fake_engine):
    fake_engine.delay = 0.002
    ws = connect(live_fake, "?format=json")
    try:
        for round_ in range(5):
            ws.send(f"prompt {round_}")
            for _ in range(100):
                ws.send("|STOP|")
        frames = read_ends(ws, 5, json_mode=True)
    finally:
        hang_up(ws)
    assert sum(frame["type"] == "end" for frame in frames) == 5
    fresh_socket_works(live_fake)


def frame_bytes(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """One websocket frame as raw bytes, legal or not (the mask key is zero, so the payload goes as is)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", size)
    return head + (b"\0\0\0\0" if masked else b"") + payload


def server_closes(ws) -> bool:
    """True when the server sends a close frame and ends the connection within the timeout.

    Read as raw bytes: under Werkzeug's development server flask-sock writes an HTTP response after the
    websocket ends, sometimes before the close frame (flask-sock issues #20 and #77), which a websocket
    client would misread as a frame. Gunicorn does not; either way the connection ends.
    """
    data = b""
    try:
        while chunk := ws.sock.recv(4096):
            data += chunk
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return b"\x88" in data


OPCODE_TEXT, OPCODE_CONT, OPCODE_PING = websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_CONT, 0x9
PROTOCOL_ABUSE = {
    "text frame with invalid UTF-8": frame_bytes(OPCODE_TEXT, b"\xff\xfe broken"),
    "text frame with an encoded surrogate": frame_bytes(OPCODE_TEXT, b"\xed\xa0\x80 surrogate"),
    "reserved opcode": frame_bytes(0x3, b"ok"),
    "reserved control opcode": frame_bytes(0xB, b"ok"),
    "control frame over 125 bytes": frame_bytes(OPCODE_PING, b"x" * 200),
    "fragmented control frame": frame_bytes(OPCODE_PING, b"x", fin=False),
    "continuation with nothing to continue": frame_bytes(OPCODE_CONT, b"x"),
    "unmasked client frame": frame_bytes(OPCODE_TEXT, b"Hi", masked=False),
    "reserved bits set": bytes([0xF1]) + frame_bytes(OPCODE_TEXT, b"Hi")[1:],
    "close reason not UTF-8": frame_bytes(0x8, struct.pack("!H", 1000) + b"\xff"),
    "close code out of range": frame_bytes(0x8, struct.pack("!H", 4999 + 1000)),
}


@pytest.mark.parametrize("name", sorted(PROTOCOL_ABUSE))
def test_protocol_abuse_closes_cleanly(live_fake, name):
    ws = connect(live_fake)
    ws.settimeout(10)
    try:
        ws.sock.sendall(PROTOCOL_ABUSE[name])
        assert server_closes(ws), f"{name}: the server neither answered nor closed"
    finally:
        hang_up(ws)
    fresh_socket_works(live_fake)


@pytest.mark.parametrize("opcode, payload", [(OPCODE_PING, b"ping"), (0xA, b""), (OPCODE_PING, b"")])
def test_legal_control_frames_change_nothing(live_fake, opcode, payload):
    ws = connect(live_fake)
    try:
        ws.sock.sendall(frame_bytes(opcode, payload))
        ws.send("Hi")
        frames = read_ends(ws, 1, json_mode=False)
    finally:
        hang_up(ws)
    assert "".join(frames[:-1]) == "Hello from the fake engine."


def test_frame_claiming_exabytes_then_hanging_up(live_fake):
    ws = connect(live_fake)
    try:
        ws.sock.sendall(bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 1 << 62) + b"\0\0\0\0" + b"a" * 65536)
    finally:
        hang_up(ws)
    fresh_socket_works(live_fake)


def open_sockets(server) -> int:
    """Websockets the server still counts as open."""
    return sum(server.app.extensions["llm_sockets"].open.values())


def test_huge_frame_is_refused_and_the_socket_is_released(live_fake):
    """A message over the size limit is refused with close code 1009 before it is buffered whole, and the
    server forgets the socket (its per-user count goes back down)."""
    ws = connect(live_fake)
    try:  # a 3 MiB text frame's header and its first 64 KiB: the size alone is enough to refuse it
        ws.sock.sendall(bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 3 << 20) + b"\0\0\0\0" + b"x" * 65536)
        head = ws.sock.recv(4)
    finally:
        hang_up(ws)
    assert head[:1] == b"\x88" and struct.unpack("!H", head[2:4])[0] == 1009, head
    deadline = time.monotonic() + 30
    while open_sockets(live_fake) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_sockets(live_fake) == 0, "the server still counts a socket it refused"
    fresh_socket_works(live_fake)
