"""The engine on the real embedded model: admission limits, eviction with suspend/restore, several models,
and the summarising history policy (on the fake engine)."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import llama_cpp
import pytest

from llm.engine import GenerationRequest, Handle, JsonConstraint, SamplingParams, Usage
from llm.engine.model import LoadedModel
from llm.engine.pacing import StepCost
from llm.engine.pool import ModelPool
from llm.engine.sampling import is_plain_greedy
from llm.engine.scheduler import SuspendedStore, common_prefix, compacting_swaps, flash_attention, runs
from llm.errors import ConfigError, Overloaded
from llm.models import ModelSpec, embedded_model_path
from llm.schema_support import validate_output
from llm.settings import load_settings


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_a_listening_consumer_is_told_of_every_piece_and_the_end_and_takes_them_without_waiting():
    handle = Handle()
    handle.push("early")  # before anyone listens
    told = []
    handle.listen(lambda: told.append(True))
    assert told and handle.take() == (["early"], False)
    handle.push("a")
    handle.push("b")
    handle.finish("stop", Usage(completion_tokens=3))
    assert len(told) == 4 and handle.take() == (["a", "b"], True)
    assert handle.take() == ([], True) and handle.finish_reason == "stop"  # the end stays the end
    failing = Handle()
    failing.listen(lambda: None)
    failing.fail(Overloaded())
    assert failing.take() == ([], True) and isinstance(failing.error, Overloaded)


def test_suspended_store_is_bounded_lru():
    store = SuspendedStore(max_bytes=10)
    store.put("a", [1], b"xxxx")
    store.put("b", [2], b"yyyy")
    store.put("c", [3], b"zzzz")  # over budget: the oldest goes
    assert store.peek_tokens("a") is None and store.peek_tokens("c") == [3]
    assert store.pop("b") == ([2], b"yyyy") and len(store) == 1
    store.put("huge", [4], b"x" * 11)
    assert store.peek_tokens("huge") is None


def test_runs_count_the_decode_passes_of_a_step():
    assert runs([True, True, False, False]) == 1
    assert runs([True, False, True, True, False, True]) == 3
    assert runs([False] * 4) == 0


def test_compacting_swaps_make_busy_streams_consecutive_with_fewest_exchanges():
    for pattern in range(256):
        busy = [bool(pattern >> i & 1) for i in range(8)]
        swaps = compacting_swaps(busy, [10] * 8)
        width = sum(busy)
        fewest = width - max((sum(busy[start:start + width]) for start in range(9 - width)), default=0)
        assert len(swaps) == fewest
        for i, j in swaps:
            assert busy[i] and not busy[j]
            busy[i], busy[j] = busy[j], busy[i]
        assert runs(busy) <= 1


def test_compacting_swaps_copy_the_fewest_cached_tokens():
    busy = [True, False, False, False, False, False, False, True]
    assert compacting_swaps(busy, [900, 0, 0, 0, 0, 0, 50, 40]) == [(7, 1)]  # not 900 tokens into id 6
    assert compacting_swaps(busy, [30, 500, 0, 0, 0, 0, 0, 40]) == [(0, 6)]  # id 1 holds a long conversation
    assert compacting_swaps([True, True, False, True], [5, 5, 5, 5]) == [(3, 2)]


def test_flash_attention_setting_reaches_llama_cpp():
    assert flash_attention("auto") == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    assert flash_attention("on") == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert flash_attention("off") == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    assert load_settings({}, {"LLM_FLASH_ATTENTION": "OFF"}).flash_attention == "off"
    with pytest.raises(ConfigError, match="LLM_FLASH_ATTENTION"):
        load_settings({}, {"LLM_FLASH_ATTENTION": "sometimes"})


def make_pool(**overrides) -> ModelPool:
    settings = {"LLM_CPU_THREADS": 2, "LLM_CONTEXT_WINDOW": 1024, "LLM_PARALLEL": 2}
    return ModelPool(load_settings({}, {**settings, **overrides}))


@pytest.fixture(scope="module")
def embedded() -> ModelSpec:
    return ModelSpec(embedded_model_path(), 1024)


def ask(pool: ModelPool, spec: ModelSpec, text: str, conversation: str | None = None, tokens: int = 8):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]
    return pool.submit(GenerationRequest(spec, messages, SamplingParams(temperature=0, max_tokens=tokens),
                                         conversation=conversation))


@pytest.mark.integration
def test_the_models_remembered_token_bytes_and_end_tokens_are_llama_cpps(embedded):
    model = LoadedModel(embedded, load_settings({}, {"LLM_CPU_THREADS": 2}))
    try:
        buffer = ctypes.create_string_buffer(256)

        def llama_piece(token: int) -> bytes:
            size = llama_cpp.llama_token_to_piece(model.vocab, token, buffer, len(buffer), 0, False)
            return buffer.raw[:size]

        for _ in range(2):  # looked up, then remembered
            assert [model.piece(token) for token in range(model.n_vocab)] == [
                llama_piece(token) for token in range(model.n_vocab)]
        assert model.piece(model.end_tokens[0], special=True) != model.piece(model.end_tokens[0])
        assert [model.is_eog(token) for token in range(model.n_vocab)] == [
            bool(llama_cpp.llama_vocab_is_eog(model.vocab, token)) for token in range(model.n_vocab)]
        assert any(model.is_eog(token) for token in range(model.n_vocab))
    finally:
        model.close()


@pytest.mark.integration
def test_full_engine_answers_503_with_retry_after(embedded):
    pool = make_pool(LLM_PARALLEL=1, LLM_QUEUE_SIZE=0)
    try:
        first = ask(pool, embedded, "Tell me a long story.", tokens=200)
        with pytest.raises(Overloaded) as info:
            ask(pool, embedded, "Me too")
        assert info.value.status == 503 and info.value.headers["Retry-After"]
        first.cancel()
        first.text()
    finally:
        pool.close()


@pytest.mark.integration
def test_eviction_suspends_and_restores_a_conversation(embedded):
    # A cache for little more than one conversation: the second evicts the first, which is restored later.
    pool = make_pool(LLM_CACHE_TOKENS=1100, LLM_PARALLEL=1)
    try:
        long_text = "Here is a detailed note about gardens, rivers and mountains. " * 50
        first = ask(pool, embedded, long_text, conversation="first")
        first.text()
        ask(pool, embedded, "Something else entirely: cities, roads and bridges. " * 50, conversation="second").text()
        stats = next(iter(pool.stats()["models"].values()))
        assert stats["evictions"] >= 1 and stats["suspends"] >= 1
        again = ask(pool, embedded, long_text, conversation="first")
        again.text()
        stats = next(iter(pool.stats()["models"].values()))
        assert stats["restores"] >= 1
        assert again.usage.cached_tokens >= first.usage.prompt_tokens - 1
    finally:
        pool.close()


@pytest.mark.integration
def test_least_recently_used_model_is_unloaded(embedded, tmp_path):
    other_path = tmp_path / "second-model.gguf"
    try:
        os.link(embedded.path, other_path)  # a distinct file (another model as far as the pool knows)
    except OSError:
        pytest.skip("hard links are not possible between the model cache and the test directory")
    other = ModelSpec(str(other_path), 1024)
    pool = make_pool(LLM_MAX_LOADED_MODELS=1)
    try:
        assert ask(pool, embedded, "Hello").text() is not None
        assert ask(pool, other, "Hello").text() is not None
        loaded = [info for info in (pool.describe(embedded), pool.describe(other)) if info["loaded"]]
        assert [info["path"] for info in loaded] == [other.path]
    finally:
        pool.close()


@pytest.mark.integration
def test_cancel_during_long_generation_frees_slot(embedded):
    pool = make_pool(LLM_PARALLEL=1)
    try:
        handle = ask(pool, embedded, "Write a very long essay.", tokens=500)
        pieces = iter(handle)
        next(pieces)
        handle.cancel()
        rest = list(pieces)
        assert handle.finish_reason == "cancelled" and len(rest) < 20
        deadline = time.monotonic() + 5
        while pool.stats()["models"][embedded.name]["active_sequences"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.stats()["models"][embedded.name]["active_sequences"] == 0
        # The freed slot serves the next request at once.
        assert ask(pool, embedded, "Hi").text() is not None
    finally:
        pool.close()


@pytest.mark.integration
def test_streams_progress_together(embedded):
    """Continuous batching: a second request gets its first token while the first is still generating."""
    pool = make_pool(LLM_PARALLEL=2)
    try:
        first = ask(pool, embedded, "Write a very long essay about the sea.", tokens=300)
        first_pieces = iter(first)
        next(first_pieces)
        second = ask(pool, embedded, "Say hello.", tokens=4)
        second.text()
        assert first.finish_reason is None  # still generating when the second finished
        first.cancel()
        list(first_pieces)
    finally:
        pool.close()


@pytest.mark.integration
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1, dry_multiplier=0.8,
                   frequency_penalty=0.2, presence_penalty=0.1, seed=42, max_tokens=12),
    SamplingParams(temperature=0, dry_multiplier=1.5, dry_allowed_length=1, max_tokens=12),
])
def test_every_sampler_option_runs_on_the_real_model(embedded, params):
    pool = make_pool()
    try:
        messages = [{"role": "user", "content": "Say something."}]
        handle = pool.submit(GenerationRequest(embedded, messages, params))
        assert handle.text() is not None and handle.finish_reason in ("stop", "length")
        if params.seed is not None:  # the same seed gives the same answer
            again = pool.submit(GenerationRequest(embedded, messages, params))
            assert again.text() == pool.submit(GenerationRequest(embedded, messages, params)).text()
    finally:
        pool.close()


def test_shipped_personalities_sampling_is_accepted_by_the_engine_signature():
    """Every shipped personality's sampling maps onto SamplingParams (no unknown keys silently dropped)."""
    from dataclasses import fields

    from llm.personalities import PersonalityRegistry

    names = {f.name for f in fields(SamplingParams)}
    for personality in PersonalityRegistry(Path(__file__).parent.parent / "personalities").all():
        assert set(personality.sampling) <= names, personality.name


def test_summarize_policy_folds_dropped_turns(make_app, fake_engine, tmp_path):
    personalities = tmp_path / "p"
    personalities.mkdir()
    (personalities / "memo.toml").write_text(
        'name = "memo"\ndescription = "d"\nintro = "i"\nsystem_prompt = "Be brief."\n'
        'history = { policy = "summarize" }\n[sampling]\ntemperature = 0\ntop_p = 1\nrepeat_penalty = 1.0\n'
        'max_tokens = 8\n', encoding="utf-8")
    app = make_app(LLM_PERSONALITIES_DIR=str(personalities), LLM_CONTEXT_WINDOW=256)
    client = app.test_client()
    for turn in range(12):
        fake_engine.script(["word " * 10])
        client.get("/gpt/memo", query_string={"prompt": f"Turn {turn} " + "filler " * 10, "session": "memo-1"})
        if any("Summary of the earlier conversation" in r.messages[0]["content"] for r in fake_engine.requests
               if r.messages):
            break
    summaries = [r for r in fake_engine.requests if r.messages and r.messages[-1]["content"].startswith("Summarise")]
    assert summaries, "the dropped turns were never summarised"
    assert "Summary of the earlier conversation" in fake_engine.requests[-1].messages[0]["content"]


PASSAGE = ("The harbour lighthouse was built in 1871 from granite quarried on the island. Its lamp burned whale oil "
           "until 1904, then kerosene, and since 1952 an electric lamp whose beam reaches twenty-two nautical miles.")


@pytest.mark.integration
def test_speculative_drafts_are_verified_and_change_nothing_but_speed(embedded):
    """Prompt-lookup drafts on an answer that copies its prompt: drafts are proposed and mostly kept, and the
    answer is the one decoding token by token gives (the prompt was chosen with no near-tie, see the README on
    floating-point differences between batch sizes); token limits and stop strings hold as without drafts."""
    pool = make_pool()
    try:
        messages = [{"role": "user", "content": f"Repeat this passage exactly, word for word:\n\n{PASSAGE}"}]

        def answer(**params):
            handle = pool.submit(GenerationRequest(embedded, messages, SamplingParams(**{"temperature": 0, **params})))
            return handle.text(), handle

        plain, _ = answer(max_tokens=60, speculative=False)
        drafted, handle = answer(max_tokens=60)
        counters = pool.stats()["models"][embedded.name]
        assert drafted == plain and counters["accepted_draft_tokens"] > 10
        assert counters["accepted_draft_tokens"] <= counters["drafted_tokens"]
        for limit in (1, 7, 13):  # a draft never runs past max_tokens
            _, handle = answer(max_tokens=limit)
            assert handle.usage.completion_tokens == limit and handle.finish_reason == "length"
        cut, handle = answer(max_tokens=60, stop=["granite"])
        assert cut == plain[:plain.index("granite")] and handle.finish_reason == "stop"
        seeded = [answer(max_tokens=30, temperature=0.8, seed=7)[0] for _ in range(2)]
        assert seeded[0] == seeded[1]  # sampling stays reproducible with a seed
    finally:
        pool.close()


@pytest.mark.integration
def test_a_stream_moves_into_the_gap_a_finished_answer_leaves_and_its_answer_is_unchanged(embedded):
    """Three streams on ids 0-2; the middle one ends first, so the scheduler exchanges one of the others with it
    (busy ids must be consecutive for a one-pass decode). The moved answer reads on from its moved cells: both long
    answers are what each gives alone (a copying prompt, no near-tie: see the README on batch sizes)."""
    pool = make_pool(LLM_PARALLEL=3)
    try:
        def submit(text: str, tokens: int):
            messages = [{"role": "user", "content": text}]
            params = SamplingParams(temperature=0, max_tokens=tokens, speculative=False)
            return pool.submit(GenerationRequest(embedded, messages, params))

        copy = f"Repeat this passage exactly, word for word:\n\n{PASSAGE}"
        quote = f"Repeat this, word for word:\n\n{PASSAGE.split('. ')[1]}."
        alone = [submit(copy, 50).text(), submit(quote, 40).text()]
        before = pool.stats()["models"][embedded.name]["moves"]
        first = submit(copy, 50)
        middle = iter(submit("Count from one to one hundred, in words.", 12))
        next(middle)  # the middle stream is generating (a dozen steps left) when the third one arrives
        third = submit(quote, 40)
        assert [first.text(), third.text()] == alone
        list(middle)
        assert pool.stats()["models"][embedded.name]["moves"] > before
    finally:
        pool.close()


@pytest.mark.integration
def test_on_a_cpu_prompts_that_arrive_together_get_their_first_tokens_one_step_apart_oldest_first(embedded):
    """With a CPU's step cost (each token's compute dwarfs a pass), three prompts queued at once are prefilled one
    per step in the order they came, and the stream already generating waits for them (within its budget), instead
    of one step for all four that would give each prompt its first token when the last is done. Nothing else
    changes: the generating stream's answer is the one it gives alone (a copying prompt: no near-tie)."""
    pool = make_pool(LLM_PARALLEL=4)
    try:
        copy = [{"role": "user", "content": f"Repeat this passage exactly, word for word:\n\n{PASSAGE}"}]
        params = SamplingParams(temperature=0, max_tokens=40, speculative=False)
        alone = pool.submit(GenerationRequest(embedded, copy, params)).text()
        scheduler = pool._worker(embedded).scheduler
        scheduler.cost = StepCost(fixed=0.002, per_token=0.005)
        events: list[tuple[str, int]] = []  # (whose hand-out, in which step), in the order they were handed out

        def watch(name: str, handle: Handle) -> Handle:
            # Called once at once, then on the scheduler's thread for each hand-out (its step counted already).
            handle.listen(lambda: events.append((name, scheduler.counters["steps"])))
            return handle

        long = watch("long", pool.submit(GenerationRequest(embedded, copy, params)))
        deadline = time.monotonic() + 120
        while len(events) < 3 and time.monotonic() < deadline:  # generating: two tokens handed out
            time.sleep(0.01)
        with scheduler._cond:  # hold the scheduler between two steps: all three are waiting at its next one
            quick = [watch(f"p{n}", ask(pool, embedded, f"Name a colour, number {n}.", tokens=4)) for n in range(3)]
        assert all(handle.text() for handle in quick) and long.text() == alone
        firsts = [[step for name, step in events if name == f"p{n}"][1] for n in range(3)]
        assert firsts[0] < firsts[1] < firsts[2]
        assert not [step for name, step in events if name == "long" and firsts[0] <= step <= firsts[2]]
    finally:
        pool.close()


@pytest.mark.integration
def test_plain_greedy_is_the_argmax_that_llama_cpps_greedy_sampler_takes(embedded):
    """Plain greedy skips llama.cpp's sampler chain (the scheduler takes the argmax itself); a zero logit bias keeps
    the chain: both write the same answer, with a grammar too."""
    plain = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=40, speculative=False)
    chained = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=40, speculative=False,
                             logit_bias=((0, 0.0),))
    assert is_plain_greedy(plain) and not is_plain_greedy(chained)
    pool = make_pool()
    try:
        messages = [{"role": "user", "content": "Name three rivers of Europe and say one thing about each."}]
        for constraint in (None, JsonConstraint({"type": "object", "properties": {"river": {"type": "string"}}})):
            answers = [pool.submit(GenerationRequest(embedded, messages, params, constraint=constraint)).text()
                       for params in (plain, chained)]
            assert answers[0] == answers[1] and answers[0]
    finally:
        pool.close()


@pytest.mark.integration
def test_speculative_drafts_respect_a_json_grammar(embedded):
    pool = make_pool()
    try:
        schema = {"type": "object", "properties": {"quote": {"type": "string"}}, "required": ["quote"]}
        messages = [{"role": "user", "content": f"Quote the first sentence as JSON {{\"quote\": ...}}:\n\n{PASSAGE}"}]
        handle = pool.submit(GenerationRequest(embedded, messages, SamplingParams(temperature=0, max_tokens=80),
                                               constraint=JsonConstraint(schema)))
        text = handle.text()
        if handle.finish_reason == "stop":
            validate_output(schema, text)
        assert pool.stats()["models"][embedded.name]["drafted_tokens"] > 0
    finally:
        pool.close()
