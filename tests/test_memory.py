"""KV cache sizing from free memory, and what the log says about it."""

from __future__ import annotations

import logging

import pytest

from llm.engine import GenerationRequest, SamplingParams
from llm.engine.memory import GIB, describe, free_memory, kv_bytes_per_token, plan_cache
from llm.models import ModelSpec, embedded_model_path
from tests.test_engine import make_pool

# A 7B Llama: 32 layers, 8 KV heads of 128 dimensions: 128 KiB per token in f16.
SEVEN_B = kv_bytes_per_token(32, 8, 128, 128)


def test_a_7b_model_with_32_windows_of_4096_wants_16_gib():
    assert SEVEN_B == 128 * 1024
    assert plan_cache(32, 4096, SEVEN_B, 64 * GIB, "GPU 0").total == 16 * GIB


def test_sequences_are_lowered_to_what_the_free_memory_holds():
    plan = plan_cache(32, 4096, SEVEN_B, 10 * GIB, "GPU 0")
    assert plan.parallel == 17  # 85% of 10 GiB holds 17 windows of 512 MiB
    level, line = describe(plan, 32)
    assert level == logging.WARNING and "LLM_PARALLEL=32" in line and "serving 17 sequences" in line
    assert "10.0 GiB free on GPU 0" in line


@pytest.mark.parametrize(("free", "expected"), [(None, 8), (100 * GIB, 8), (GIB // 4, 1)])
def test_plenty_or_unknown_memory_keeps_the_setting_and_one_sequence_always_remains(free, expected):
    plan = plan_cache(8, 4096, SEVEN_B, free, "host memory")
    assert plan.parallel == expected
    level, line = describe(plan, 8)
    if expected == 8:
        assert level == logging.INFO and line.startswith("KV cache: 8 sequences x 4096 tokens")
    else:
        assert "even one window does not fit" in line


def test_host_memory_is_read():
    free, where = free_memory(on_gpu=False)
    assert where == "host memory" and (free is None or free > 0)


@pytest.mark.integration
def test_the_real_engine_says_where_the_model_and_the_cache_went(caplog):
    caplog.set_level(logging.INFO, logger="llm")
    pool = make_pool()
    try:
        spec = ModelSpec(embedded_model_path(), 1024)
        pool.submit(GenerationRequest(spec, [{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=2))).text()
    finally:
        pool.close()
    text = caplog.text
    assert "KV cache: 2 sequences x 1024 tokens x 22 KiB" in text
    assert "CPU only: llama.cpp was built without GPU support" in text or "offloaded" in text
