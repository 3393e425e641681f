"""The random-weight model the GPU bench writes (bench/random_gguf.py): the embedded model's tokenizer and chat
template, carried as a vocabulary-only file, in a model llama.cpp loads and runs."""

from __future__ import annotations

import llama_cpp
import pytest

from bench.random_gguf import SIZES, embedded_model, write


@pytest.mark.integration
def test_a_random_model_reads_and_renders_text_as_the_model_it_is_like(tmp_path):
    vocabulary = write(tmp_path / "vocab.gguf", embedded_model(), None)
    assert vocabulary.stat().st_size < 4 << 20  # small enough to carry to a machine with no network
    model = write(tmp_path / "tiny.gguf", vocabulary, "tiny")
    real = llama_cpp.Llama(str(embedded_model()), n_ctx=256, verbose=False)
    random = llama_cpp.Llama(str(model), n_ctx=256, n_threads=2, verbose=False)
    try:
        text = "Question 7: tell me everything about lighthouses, <|im_start|> and naïve café."
        assert random.tokenize(text.encode(), special=True) == real.tokenize(text.encode(), special=True)
        assert random.metadata["tokenizer.chat_template"] == real.metadata["tokenizer.chat_template"]
        embedding, layers, *_ = SIZES["tiny"]
        assert (random.n_embd(), int(random.metadata["llama.block_count"])) == (embedding, layers)
        answer = random.create_completion("Hello", max_tokens=6, temperature=0)
        assert answer["usage"]["completion_tokens"] >= 1  # runs; the text is noise
    finally:
        real.close()
        random.close()
