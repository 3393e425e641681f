"""Resumable answers: a JSON-mode answer outlives its websocket, and a new socket picks it up where the old one
stopped, with real websocket clients against the real server on 127.0.0.1 (fake engine)."""

from __future__ import annotations

import json
import time

import pytest
import websocket

from llm.web.api.answers import MAX_DETACHED_PER_OWNER, Answers
from tests.conftest import LiveServer

WORDS = [f" w{i}" for i in range(20)]  # the greedy personality answers at most 24 tokens


def connect(server, query="?format=json", cookie=None):
    header = [f"Cookie: {cookie}"] if cookie else None
    return websocket.create_connection(f"{server.ws_url}/gpt-socket/greedy{query}", timeout=30, header=header)


def frames_until_end(ws) -> list[dict]:
    frames = []
    while not frames or frames[-1]["type"] != "end":
        frames.append(json.loads(ws.recv()))
    return frames


def start_and_drop(server, engine, after_tokens: int, query="?format=json") -> tuple[list[dict], str]:
    """Ask a long answer, read a few of its tokens, and drop the socket without a word (a lost connection)."""
    engine.delay = 0.05
    engine.script(WORDS)
    ws = connect(server, query)
    ws.send("Talk a lot")
    frames = []
    while sum(frame["type"] == "token" for frame in frames) < after_tokens:
        frames.append(json.loads(ws.recv()))
    ws.shutdown()  # no close handshake: the server learns of it as a network failure
    return frames, frames[0]["answer"]


def wait_for(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def text_of(frames: list[dict]) -> str:
    return "".join(frame.get("text", "") for frame in frames if frame["type"] == "token")


def test_json_frames_are_numbered_from_a_start_frame(live_fake, fake_engine):
    ws = connect(live_fake)
    ws.send("Hi")
    frames = frames_until_end(ws)
    ws.close()
    assert frames[0]["type"] == "start" and frames[0]["conversation"]
    assert [frame["seq"] for frame in frames] == list(range(1, len(frames) + 1))
    assert {frame["answer"] for frame in frames} == {frames[0]["answer"]} and len(frames[0]["answer"]) >= 20


def test_plain_frames_are_unchanged(live_fake):
    ws = connect(live_fake, query="")
    ws.send("Hi")
    first = ws.recv()
    ws.close()
    assert first == "Hello"


def test_a_dropped_answer_resumes_on_a_new_socket_without_a_second_generation(live_fake, fake_engine):
    before, answer = start_and_drop(live_fake, fake_engine, 5)
    time.sleep(0.5)  # generation goes on meanwhile, into the buffer
    ws = connect(live_fake, f"?format=json&resume={answer}&after={before[-1]['seq']}")
    after = frames_until_end(ws)
    assert [frame["seq"] for frame in after] == list(range(before[-1]["seq"] + 1, before[-1]["seq"] + 1 + len(after)))
    assert text_of(before + after) == "".join(WORDS), after[-1]  # nothing lost, nothing twice
    assert after[-1]["finish_reason"] == "stop" and len(fake_engine.requests) == 1
    ws.send("And then?")  # the socket goes on with the same conversation
    frames_until_end(ws)
    ws.close()
    assert fake_engine.requests[1].conversation == fake_engine.requests[0].conversation


def test_a_finished_answer_can_still_be_read_to_its_end(live_fake, fake_engine):
    before, answer = start_and_drop(live_fake, fake_engine, 2)
    store = live_fake.app.extensions["llm_sockets"].answers
    wait_for(lambda: store.claim(answer, "addr:127.0.0.1").done)
    ws = connect(live_fake, f"?format=json&resume={answer}&after={before[-1]['seq']}")
    after = frames_until_end(ws)
    ws.close()
    assert text_of(before + after) == "".join(WORDS)


def test_stop_after_resuming_stops_the_answer(live_fake, fake_engine):
    before, answer = start_and_drop(live_fake, fake_engine, 2)
    ws = connect(live_fake, f"?format=json&resume={answer}&after={before[-1]['seq']}")
    ws.send("|STOP|")
    after = frames_until_end(ws)
    ws.close()
    assert after[-1]["finish_reason"] == "cancelled" and fake_engine.cancelled.is_set()
    assert len(text_of(before + after)) < len("".join(WORDS))


@pytest.mark.parametrize("answer", ["nonsense", None])
def test_an_unknown_or_someone_elses_answer_is_410(live_fake, fake_engine, answer):
    if answer is None:  # a real answer, resumed by another user (an anonymous browser identity of its own)
        _, answer = start_and_drop(live_fake, fake_engine, 1)
        with live_fake.app.test_client().get("/") as page:
            cookie = page.headers["Set-Cookie"].split(";")[0]
    else:
        cookie = None
    ws = connect(live_fake, f"?format=json&resume={answer}&after=0", cookie=cookie)
    frames = frames_until_end(ws)
    ws.close()
    assert frames[0]["type"] == "error" and frames[0]["status"] == 410 and not text_of(frames)


@pytest.mark.parametrize("seconds", [0.5, 0], ids=["nobody-comes-back", "resuming-off"])
def test_a_dropped_answer_is_cancelled_when_nobody_comes_back_or_resuming_is_off(make_app, fake_engine, seconds):
    server = LiveServer(make_app(LLM_RESUME_SECONDS=seconds))
    try:
        start_and_drop(server, fake_engine, 1)
        assert fake_engine.cancelled.wait(30)
    finally:
        server.close()


def test_an_owner_cannot_leave_more_than_a_few_answers_running(live_fake, fake_engine):
    store = live_fake.app.extensions["llm_sockets"].answers
    answers = [start_and_drop(live_fake, fake_engine, 1)[1] for _ in range(MAX_DETACHED_PER_OWNER + 1)]
    wait_for(lambda: store.claim(answers[-1], "addr:127.0.0.1").cancelled)
    assert not any(store.claim(answer, "addr:127.0.0.1").cancelled for answer in answers[:-1])


def test_the_buffer_forgets_finished_answers_after_the_window():
    now = [0.0]
    answers = Answers(10, clock=lambda: now[0])
    sent = []
    answer = answers.start("u", "c", sent.append)
    answer.emit({"type": "token", "text": "a"})
    answer.emit({"type": "end"})
    assert answers.claim(answer.id, "u") is answer and answers.claim(answer.id, "v") is None
    now[0] = 11
    assert answers.claim(answer.id, "u") is None and len(answers) == 0
    assert [json.loads(text)["seq"] for text in sent] == [1, 2]
