"""End to end on the real embedded model: /gpt, the websocket, batching, cache reuse, cancellation, budgets."""

from __future__ import annotations

import json
import threading
import time

import pytest
import websocket

pytestmark = pytest.mark.integration


def engine_stats(app) -> dict:
    models = app.extensions["llm"].engine.stats()["models"]
    return next(iter(models.values()))


def wait_idle(app, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine_stats(app)
        if stats["active_sequences"] == 0 and stats["queue_depth"] == 0:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {engine_stats(app)}")


def json_turn(ws, prompt: str) -> tuple[str, dict]:
    ws.send(prompt)
    text = ""
    while True:
        frame = json.loads(ws.recv())
        if frame["type"] == "token":
            text += frame["text"]
        elif frame["type"] == "error":
            raise AssertionError(frame)
        elif frame["type"] == "end":
            return text, frame


def test_gpt_answers_with_real_model_deterministically(real_app):
    client = real_app.test_client()
    first = client.get("/gpt/greedy?prompt=Write one sentence about the sea.")
    second = client.get("/gpt/greedy?prompt=Write one sentence about the sea.")
    assert first.status_code == 200, first.get_data(as_text=True)
    text = first.get_data(as_text=True)
    assert text.strip()
    assert text == second.get_data(as_text=True)
    # The model's own ChatML template, never llama-2's [INST] guess.
    assert "[INST]" not in text and "<<SYS>>" not in text
    assert first.headers["X-Finish-Reason"] in ("stop", "length")


def test_chat_format_comes_from_the_gguf_template(real_app):
    info = real_app.extensions["llm"].engine.describe(real_app.extensions["llm"].specs())
    assert info["architecture"] == "llama" and info["chat_format"] == "template"


def test_stop_string_cuts_answer(real_app):
    engine = real_app.extensions["llm"].engine
    from llm.engine import GenerationRequest, SamplingParams

    spec = real_app.extensions["llm"].specs()
    messages = [{"role": "user", "content": "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9"}]
    full = engine.submit(GenerationRequest(spec, messages, SamplingParams(temperature=0, max_tokens=20))).text()
    assert len(full) > 4
    stop = full[2:4]
    handle = engine.submit(GenerationRequest(spec, messages, SamplingParams(temperature=0, max_tokens=20,
                                                                            stop=(stop,))))
    cut = handle.text()
    assert stop not in cut and full.startswith(cut) and handle.finish_reason == "stop"


WORDS = ["apple", "river", "castle", "guitar", "planet", "pepper", "violet", "rocket"]


def test_eight_concurrent_requests_each_get_their_own_answer(real_app):
    """Eight clients at once: each answer is complete and made from its own prompt, never another's.

    Each client asks for a different word to be written out; an answer that contains another client's word would
    mean sequences leaked into each other in the batch."""
    together: dict[int, tuple[int, str]] = {}

    def run(index: int) -> None:
        prompt = f"Write the word {WORDS[index]} three times."
        response = real_app.test_client().get("/gpt/greedy", query_string={"prompt": prompt})
        together[index] = (response.status_code, response.get_data(as_text=True))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(together) == list(range(8)) and all(status == 200 for status, _ in together.values())
    for index, (_, answer) in together.items():
        strangers = [word for word in WORDS if word != WORDS[index] and word in answer.lower()]
        assert not strangers, (index, answer)
    assert sum(WORDS[index] in answer.lower() for index, (_, answer) in together.items()) >= 6
    wait_idle(real_app)


def test_follow_up_turn_reuses_the_cache(live_real, real_app):
    ws = websocket.create_connection(f"{live_real.ws_url}/gpt-socket/greedy?format=json", timeout=60)
    try:
        _, first = json_turn(ws, "|SESSION|cache-test|/SESSION|Name three colours.")
        _, second = json_turn(ws, "And three animals?")
    finally:
        ws.close()
    assert first["conversation"] == second["conversation"] == "cache-test"
    usage = second["usage"]
    # Only the new turn is prefilled: everything up to the end of the first answer comes from the cache.
    assert usage["cached_tokens"] >= first["usage"]["prompt_tokens"]
    assert usage["prompt_tokens"] - usage["cached_tokens"] < 30


def test_new_conversation_shares_the_system_prompt_prefix(real_app):
    client = real_app.test_client()
    client.get("/gpt/greedy?prompt=Hello there, first user.")
    before = engine_stats(real_app)["cache_hit_tokens"]
    client.get("/gpt/greedy?prompt=A different question from someone else.")
    assert engine_stats(real_app)["cache_hit_tokens"] - before >= 8


def test_disconnect_frees_the_sequence(live_real, real_app):
    ws = websocket.create_connection(f"{live_real.ws_url}/gpt-socket/greedy", timeout=60)
    spec = real_app.extensions["llm"].personalities.get("greedy")
    assert spec.sampling["max_tokens"] > 0
    ws.send("Write a very long story about a dragon.")
    ws.recv()
    steps_at_close = engine_stats(real_app)["steps"]
    ws.close()
    stats = wait_idle(real_app)
    # Leaves within a few steps of the close being noticed (24 tokens would be the full answer).
    assert stats["steps"] - steps_at_close < 20


def test_long_conversation_keeps_answering_and_reports_trimming(live_real):
    ws = websocket.create_connection(f"{live_real.ws_url}/gpt-socket/greedy?format=json", timeout=60)
    trimmed_total = 0
    try:
        for turn in range(50):
            text, end = json_turn(ws, f"Turn {turn}: tell me something about the number {turn}, in detail please.")
            assert end["finish_reason"] in ("stop", "length")
            trimmed_total += end["trimmed_turns"]
    finally:
        ws.close()
    assert trimmed_total > 0  # the 1024-token window cannot hold 50 turns


def test_prompt_too_large_is_413_with_counts(real_app):
    client = real_app.test_client()
    response = client.post("/gpt/greedy", json={"prompt": "word " * 3000})
    assert response.status_code == 413
    message = response.get_json()["error"]["message"]
    assert "tokens" in message and "1024" in message



def test_ignore_eos_runs_to_max_tokens_and_logit_bias_steers(real_app):
    from llm.engine import GenerationRequest, SamplingParams

    engine, spec = real_app.extensions["llm"].engine, real_app.extensions["llm"].specs()
    messages = [{"role": "user", "content": "Say yes or no."}]  # "Yes." and the end (61 tokens for "Say yes.")
    short = engine.submit(GenerationRequest(spec, messages, SamplingParams(temperature=0, max_tokens=64)))
    text = short.text()
    assert short.finish_reason == "stop" and short.usage.completion_tokens < 64
    longer = engine.submit(GenerationRequest(spec, messages, SamplingParams(temperature=0, max_tokens=64,
                                                                             ignore_eos=True)))
    longer.text()
    assert longer.finish_reason == "length" and longer.usage.completion_tokens == 64
    model = engine.engine_for(spec)._worker(spec).model
    first = model.tokenize_plain(text)[0]
    steered = engine.submit(GenerationRequest(spec, messages, SamplingParams(
        temperature=0, max_tokens=8, logit_bias=((first, float("-inf")),)))).text()
    assert not steered.startswith(model.piece(first).decode("utf-8", "replace"))
