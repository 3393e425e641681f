"""The websocket contract, with a real websocket client against a real server on 127.0.0.1 (fake engine)."""

from __future__ import annotations

import json
import threading

import pytest
import websocket

from llm.errors import Overloaded


def connect(server, personality="greedy", query=""):
    return websocket.create_connection(f"{server.ws_url}/gpt-socket/{personality}{query}", timeout=10)


def read_answer(ws) -> list[str]:
    """Frames up to and including <END>."""
    frames = []
    while True:
        frame = ws.recv()
        frames.append(frame)
        if frame == "<END>":
            return frames


def read_json_answer(ws) -> list[dict]:
    frames = []
    while True:
        frame = json.loads(ws.recv())
        frames.append(frame)
        if frame["type"] == "end":
            return frames


def test_prompt_then_answer_plain(live_fake, fake_engine):
    ws = connect(live_fake)
    ws.send("Hi")
    frames = read_answer(ws)
    ws.close()
    assert "".join(frames[:-1]) == "Hello from the fake engine."
    assert fake_engine.requests[-1].messages[-1]["content"] == "Hi"


def test_multi_turn_keeps_history(live_fake, fake_engine):
    ws = connect(live_fake)
    fake_engine.script(["Answer one."])
    ws.send("One")
    read_answer(ws)
    ws.send("Two")
    read_answer(ws)
    ws.close()
    contents = [m["content"] for m in fake_engine.requests[-1].messages[1:]]
    assert contents == ["One", "Answer one.", "Two"]
    assert fake_engine.requests[0].conversation == fake_engine.requests[1].conversation


def test_session_resumes_on_a_new_socket(live_fake, fake_engine):
    ws = connect(live_fake)
    fake_engine.script(["Remembered."])
    ws.send("|SESSION|case-42|/SESSION|Remember this")
    read_answer(ws)
    ws.close()
    ws = connect(live_fake)
    ws.send("|SESSION|case-42|/SESSION|What did I say?")
    read_answer(ws)
    ws.close()
    request = fake_engine.requests[-1]
    assert request.conversation == live_fake.app.extensions["llm"].store.get("case-42").key
    assert [m["content"] for m in request.messages[1:]] == ["Remember this", "Remembered.", "What did I say?"]


def test_stop_ends_answer_and_end_follows(live_fake, fake_engine):
    fake_engine.delay = 0.05
    fake_engine.script([f" w{i}" for i in range(200)])
    ws = connect(live_fake)
    ws.send("Talk a lot")
    first = ws.recv()
    ws.send("|STOP|")
    frames = [first] + read_answer(ws)
    assert frames[-1] == "<END>"
    assert len(frames) < 100
    assert fake_engine.cancelled.wait(5)
    ws.send("Still there?")  # the socket stays usable
    assert read_answer(ws)[-1] == "<END>"
    ws.close()


def test_disconnect_mid_answer_cancels(live_fake, fake_engine):
    fake_engine.delay = 0.05
    fake_engine.script([f" w{i}" for i in range(400)])
    ws = connect(live_fake)
    ws.send("Talk a lot")
    ws.recv()
    ws.close()
    assert fake_engine.cancelled.wait(5)


def test_unknown_personality_error_frame(live_fake):
    ws = connect(live_fake, "nobody")
    frames = read_answer(ws)
    ws.close()
    assert frames[0].startswith("<ERROR> Unknown personality 'nobody'")
    assert frames[-1] == "<END>"


def test_overloaded_error_frame_keeps_socket(live_fake, fake_engine):
    fake_engine.script(Overloaded())
    ws = connect(live_fake)
    ws.send("Hi")
    frames = read_answer(ws)
    ws.send("Again")
    again = read_answer(ws)
    ws.close()
    assert frames[0].startswith("<ERROR> ") and "busy" in frames[0]
    assert "".join(again[:-1]) == "Hello from the fake engine."


def test_binary_frame_is_an_error(live_fake):
    ws = connect(live_fake)
    ws.send_binary(b"\xff\xfe")
    frames = read_answer(ws)
    ws.close()
    assert frames[0].startswith("<ERROR> Binary frames")


def test_json_mode_frames(live_fake):
    ws = connect(live_fake, query="?format=json")
    ws.send("|SESSION|json-1|/SESSION|Hi")
    frames = read_json_answer(ws)
    ws.close()
    tokens = [frame["text"] for frame in frames if frame["type"] == "token"]
    assert "".join(tokens) == "Hello from the fake engine."
    end = frames[-1]
    assert end["conversation"] == "json-1"
    assert end["usage"]["completion_tokens"] == 5
    assert end["trimmed_turns"] == 0 and end["finish_reason"] == "stop"


def test_json_mode_error(live_fake):
    ws = connect(live_fake, query="?format=json")
    ws.send("   ")
    frames = read_json_answer(ws)
    assert frames[-1]["type"] == "end"
    ws.send_binary(b"x")
    frames = read_json_answer(ws)
    ws.close()
    assert frames[0]["type"] == "error" and frames[0]["status"] == 400


@pytest.mark.parametrize("clients", [8])
def test_concurrent_sockets_each_get_their_own_answer(live_fake, fake_engine, clients):
    fake_engine.delay = 0.002
    results: dict[int, str] = {}

    def run(index: int) -> None:
        ws = connect(live_fake)
        ws.send(f"|SESSION|client-{index}|/SESSION|Hello {index}")
        results[index] = "".join(read_answer(ws)[:-1])
        ws.close()

    for index in range(clients):
        fake_engine.script([f"answer-{index}"])
    threads = [threading.Thread(target=run, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(results) == clients
    # Scripts are handed out in submit order; each client must get exactly one whole scripted answer.
    assert sorted(results.values()) == sorted(f"answer-{index}" for index in range(clients))
    store = live_fake.app.extensions["llm"].store
    by_conversation = {r.conversation: r.messages[-1]["content"] for r in fake_engine.requests}
    for index in range(clients):
        assert by_conversation[store.get(f"client-{index}").key] == f"Hello {index}"


def test_regenerate_answers_the_last_question_again_as_a_variant(live_fake, fake_engine):
    store = live_fake.app.extensions["llm"].store
    ws = connect(live_fake, query="?format=json")
    fake_engine.script(["First answer."])
    ws.send("|SESSION|regen-1|/SESSION|Question?")
    first = read_json_answer(ws)[-1]
    fake_engine.script(["Second answer."])
    ws.send("|REGENERATE|")
    second = read_json_answer(ws)[-1]
    ws.close()
    request = fake_engine.requests[-1]
    assert [m["content"] for m in request.messages[1:]] == ["Question?"]  # not the first answer, not twice
    assert request.conversation == fake_engine.requests[0].conversation  # the same cache
    assert second["question_id"] == first["question_id"]
    turns = store.get("regen-1", "anonymous").public()["turns"]
    assert [t["content"] for t in turns] == ["Question?", "Second answer."]
    assert turns[1]["variants"] == [first["message_id"], second["message_id"]]


def test_edit_replaces_a_question_and_keeps_the_earlier_branch(live_fake, fake_engine, client):
    ws = connect(live_fake, query="?format=json")
    ws.send("|SESSION|edit-1|/SESSION|One")
    one = read_json_answer(ws)[-1]["question_id"]
    ws.send("Two")
    read_json_answer(ws)
    ws.send(f"|EDIT|{one}|/EDIT|Uno")
    read_json_answer(ws)
    ws.send("|EDIT|123456789|/EDIT|Nope")  # not a question of this conversation
    refused = read_json_answer(ws)
    ws.close()
    ws = connect(live_fake, query="?format=json")
    ws.send("|SESSION|edit-2|/SESSION||REGENERATE|")  # nothing to regenerate in a new conversation
    nothing = read_json_answer(ws)
    ws.close()
    assert [m["content"] for m in fake_engine.requests[-1].messages[1:]] == ["Uno"]
    refused, nothing = (next(f for f in frames if f["type"] == "error") for frames in (refused, nothing))
    assert refused["status"] == 400 and "not one of this conversation's questions" in refused["message"]
    assert nothing["status"] == 400 and "no answer to regenerate" in nothing["message"]
    with client.get("/conversations/edit-1") as response:
        turns = response.get_json()["turns"]
    assert [t["content"] for t in turns] == ["Uno", "Hello from the fake engine."]
    assert turns[0]["variants"][0] == one
    with client.post(f"/conversations/edit-1/messages/{one}/choose") as response:
        assert [t["content"] for t in response.get_json()["turns"]] == [
            "One", "Hello from the fake engine.", "Two", "Hello from the fake engine."]
    with client.post("/conversations/edit-1/messages/99999999/choose") as response:
        assert response.status_code == 404 and response.get_json()["error"]["type"] == "not_found"


class LoopThread:
    """A real event loop in a thread, as uvicorn runs one, and a ``send`` that keeps what it sends and can be
    held (a client that stops reading) or made to fail (a client that went away)."""

    def __init__(self):
        import asyncio

        self.asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sent: list[str] = []
        self.open = threading.Event()  # cleared: sends wait (a reader that does not read)
        self.open.set()
        self.failure: Exception | None = None

    async def send(self, event):
        while not self.open.is_set():
            await self.asyncio.sleep(0.01)
        if self.failure is not None:
            raise self.failure
        self.sent.append(event["text"])

    def call(self, function, *args):
        """Run ``function`` on the loop (what the server's coroutines do) and return its result."""
        async def run():
            result = function(*args)
            return await result if self.asyncio.iscoroutine(result) else result
        return self.asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=30)

    def close(self):
        async def cancel_the_rest():
            tasks = self.asyncio.all_tasks() - {self.asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await self.asyncio.gather(*tasks, return_exceptions=True)

        self.call(cancel_the_rest)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def loop_thread():
    running = LoopThread()
    yield running
    running.close()


def outbox(loop_thread, limit=1 << 20):
    from llm.web.api.socket import Outbox

    return loop_thread.call(lambda: Outbox(loop_thread.loop, loop_thread.send, limit))


def test_outbox_sends_every_frame_in_order_and_drain_waits_for_them(loop_thread):
    box = outbox(loop_thread)
    frames = [f"token {i}" for i in range(500)]
    answer = threading.Thread(target=lambda: [box.put(frame) for frame in frames])
    answer.start()
    answer.join(timeout=30)
    loop_thread.call(box.drain)
    assert loop_thread.sent == frames
    loop_thread.call(box.close)


def test_outbox_never_holds_up_an_answer_and_drops_a_reader_too_far_behind(loop_thread):
    box = outbox(loop_thread, limit=90)
    loop_thread.open.clear()  # the client stops reading
    for i in range(10):
        box.put(f"token {i:02}")  # 8 characters each: queued at once, nothing waits on the loop
    with pytest.raises(ConnectionError):
        box.put("token 10 and more")  # past 90 characters not yet sent
    with pytest.raises(ConnectionError):
        box.put("x")  # and from then on
    loop_thread.open.set()
    loop_thread.call(box.close)


def test_outbox_after_a_failed_send_or_a_close_every_put_raises(loop_thread):
    box = outbox(loop_thread)
    loop_thread.failure = OSError("the client went away")
    box.put("first")
    loop_thread.call(box.drain)
    with pytest.raises(ConnectionError):
        box.put("second")

    loop_thread.failure = None
    box = outbox(loop_thread)
    loop_thread.call(box.close)  # the socket closed while an answer was still being written
    with pytest.raises(ConnectionError):
        box.put("late")


def test_the_relay_wakes_the_loop_once_for_a_burst_of_pieces_from_many_answers(loop_thread):
    """The scheduler hands a step's pieces out together: every answer is served, the loop woken once."""
    from llm.web.api.socket import Relay

    relay, served, wakes = Relay(loop_thread.loop), [], []
    original = loop_thread.loop.call_soon_threadsafe
    loop_thread.loop.call_soon_threadsafe = lambda *args: (wakes.append(args), original(*args))[1]
    hold = threading.Event()
    loop_thread.loop.call_soon_threadsafe(hold.wait, 30)  # the loop is busy while the burst arrives
    consumers = [lambda n=n: served.append(n) for n in range(8)]
    for consumer in consumers:
        relay.notify(consumer)
    relay.notify(consumers[0])  # told twice before the loop ran: served once
    hold.set()
    loop_thread.call(lambda: None)
    assert served == list(range(8))
    assert [args[0] for args in wakes].count(relay._run) == 1  # one wake-up for all eight


class ScriptedTurn:
    """What RelayedAnswer needs of an ActiveTurn, over a real Handle."""

    def __init__(self, timeout: float = 30.0):
        from llm.engine import Handle

        self.handle = Handle(timeout=timeout)
        self.text, self.observed = "", 0

    def take(self):
        pieces, done = self.handle.take()
        self.text += "".join(pieces)
        return pieces, done

    def cancel(self):
        self.handle.cancel()

    def ended(self, error=None):
        self.observed += 1
        if error or self.handle.error:
            raise error or self.handle.error


def test_a_relayed_answer_sends_its_pieces_and_raises_a_failed_send_or_the_deadline():
    from llm.engine import Usage
    from llm.errors import TimedOut
    from llm.web.api.socket import Frames, RelayedAnswer

    sent = []
    turn = ScriptedTurn()
    relayed = RelayedAnswer(turn, Frames(sent.append, json_mode=False))
    turn.handle.listen(relayed)  # called on the producer's thread here: the relay's loop is not needed
    turn.handle.push("Hello")
    turn.handle.push(" there")
    turn.handle.finish("stop", Usage())
    relayed.wait()
    assert sent == ["Hello", " there"] and turn.text == "Hello there" and turn.observed == 1

    def gone(text):
        raise ConnectionError("the client went away")

    turn = ScriptedTurn()
    relayed = RelayedAnswer(turn, Frames(gone, json_mode=False))
    turn.handle.listen(relayed)
    turn.handle.push("lost")
    with pytest.raises(ConnectionError):
        relayed.wait()
    assert turn.handle.cancelled and turn.observed == 1

    turn = ScriptedTurn(timeout=0.05)  # nothing ever arrives
    relayed = RelayedAnswer(turn, Frames(sent.append, json_mode=False))
    turn.handle.listen(relayed)
    with pytest.raises(TimedOut):
        relayed.wait()
    assert turn.handle.cancelled and turn.observed == 1
