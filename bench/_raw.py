"""The baseline: llama.cpp's own decode loop through llama-cpp-python's low-level API, in this process.

One sequence, one token per ``llama_decode``, greedy sampling: the fastest a single stream can go on this
machine, with no server, no Python scheduler and no network in the way. Weights and vocabulary are loaded
with the service's ``LoadedModel`` (a plain ``llama_model_load_from_file``) so the prompt is rendered and
tokenized exactly as the service does it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import llama_cpp

from llm.engine.model import LoadedModel
from llm.models import ModelSpec
from llm.settings import Settings


@dataclass
class DecodeRun:
    """One raw generation: tokens produced and the decode rate between the first and last sampled token."""

    tokens: list[int]
    tokens_per_second: float


class RawLlama:
    """A model and one single-sequence context, used for rendering prompts and for the raw decode loop."""

    def __init__(self, spec: ModelSpec, settings: Settings, n_ctx: int = 4096):
        self.model = LoadedModel(spec, settings)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, 512, 512
        params.n_threads = params.n_threads_batch = settings.cpu_threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model.ptr, params)
        if not self.ctx:
            raise MemoryError("could not create the baseline llama context")
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)

    def render(self, system: str, prompt: str) -> str:
        """The prompt text the service's chat format produces (no BOS: tokenizers add it)."""
        return self.model.render([{"role": "system", "content": system}, {"role": "user", "content": prompt}])

    def _decode(self, tokens: list[int], start: int) -> None:
        batch = self.batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, i == len(tokens) - 1
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed in the baseline loop")

    def generate(self, text: str, n_tokens: int) -> DecodeRun:
        """Prefill ``text``, then sample greedily and decode one token per call, never stopping at EOS."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        prompt = self.model.tokenize(text)
        self._decode(prompt, 0)
        sampler = llama_cpp.llama_sampler_init_greedy()
        out: list[int] = []
        first = last = 0.0
        try:
            for i in range(n_tokens):
                token = llama_cpp.llama_sampler_sample(sampler, self.ctx, -1)
                last = time.perf_counter()
                first = first or last
                out.append(token)
                if i + 1 < n_tokens:
                    self._decode([token], len(prompt) + i)
        finally:
            llama_cpp.llama_sampler_free(sampler)
        rate = (n_tokens - 1) / (last - first) if n_tokens > 1 and last > first else 0.0
        return DecodeRun(out, rate)

    def text(self, tokens: list[int]) -> str:
        """Detokenized output, to show what a prompt makes the model write."""
        return b"".join(self.model.piece(token) for token in tokens).decode("utf-8", "replace")

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        self.model.close()
