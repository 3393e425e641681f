"""Per-request sampling: llama.cpp sampler chains, and turning sampled tokens into clean text.

Each request owns its sampler chain (penalties, DRY, top-k/p, min-p, temperature, seeded distribution), so
requests decoded in one batch never share state. ``TextStream`` handles the two things that make raw token
pieces unfit for clients: UTF-8 characters split across tokens, and stop strings that must never be shown
even partially.
"""

from __future__ import annotations

import codecs
import ctypes
import random

import llama_cpp
import numpy as np

from llm.engine import SamplingParams, TokenLogprob

# DRY's default sequence breakers (llama.cpp's common defaults): repetition across these is not penalised.
_DRY_BREAKERS = ("\n", ":", '"', "*")


def token_logprob(logits: np.ndarray, token: int, top: int, piece) -> TokenLogprob:
    """The sampled token's log-probability (a log-softmax of the logits) and the ``top`` most likely tokens;
    ``piece(token)`` gives a token's bytes. Costs one pass over the vocabulary, so only for requests asking."""
    peak = float(logits.max())
    total = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
    best: tuple[tuple[bytes, float], ...] = ()
    if top:
        candidates = np.argpartition(logits, -top)[-top:]
        candidates = candidates[np.argsort(logits[candidates])[::-1]]
        best = tuple((piece(int(t)), float(logits[t]) - total) for t in candidates)
    return TokenLogprob(piece(token), float(logits[token]) - total, best)


def is_plain_greedy(params: SamplingParams) -> bool:
    """Greedy with nothing that changes the logits first: the answer is the logits' argmax, which the scheduler
    takes itself (10 µs) instead of llama.cpp's sampler (185 µs: it copies the whole vocabulary into a candidate
    array first), per sequence and token."""
    return (params.temperature <= 0 and not params.logit_bias and not params.ignore_eos and params.repeat_penalty == 1.0
            and not params.frequency_penalty and not params.presence_penalty and params.dry_multiplier <= 0)


def build_sampler(params: SamplingParams, vocab, n_vocab: int, end_tokens: tuple[int, ...] = ()):
    """A sampler chain for one request; the caller frees it with ``llama_sampler_free``.

    ``end_tokens`` (the vocabulary's end-of-generation tokens) are forbidden when the request ignores EOS."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = lambda sampler: llama_cpp.llama_sampler_chain_add(chain, sampler)  # noqa: E731
    biases = list(params.logit_bias) + [(token, float("-inf")) for token in end_tokens if params.ignore_eos]
    if biases:
        array = (llama_cpp.llama_logit_bias * len(biases))(*(llama_cpp.llama_logit_bias(t, b) for t, b in biases))
        add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), array))
    if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
        add(llama_cpp.llama_sampler_init_penalties(n_vocab, params.repeat_last_n, params.repeat_penalty,
                                                   params.frequency_penalty, params.presence_penalty))
    if params.dry_multiplier > 0:
        breakers = (ctypes.c_char_p * len(_DRY_BREAKERS))(*(b.encode() for b in _DRY_BREAKERS))
        add(llama_cpp.llama_sampler_init_dry(vocab, params.dry_multiplier, params.dry_base,
                                             params.dry_allowed_length, -1, breakers, len(_DRY_BREAKERS)))
    if params.temperature <= 0:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(params.top_k))
    add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0:
        add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


class TextStream:
    """Bytes of token pieces in, safe text out: complete UTF-8 only, stop strings cut, never shown in part."""

    def __init__(self, stops: tuple[str, ...]):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, piece: bytes) -> str:
        """Add a token's bytes; returns the text that is now safe to send."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(piece)
        found = [(index, stop) for stop in self._stops if (index := self._held.find(stop)) >= 0]
        if found:  # the earliest stop string wins, whatever the order they were given in
            index, self.matched = min(found, key=lambda item: item[0])
            self.stopped = True
            text, self._held = self._held[:index], ""
            return text
        keep = self._longest_stop_prefix_suffix()
        text = self._held[: len(self._held) - keep]
        self._held = self._held[len(text):]
        return text

    def flush(self) -> str:
        """The text still held back when generation ends without a stop string."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text

    def _longest_stop_prefix_suffix(self) -> int:
        """Length of the longest tail of the held text that could still grow into a stop string."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._held)), best, -1):
                if self._held.endswith(stop[:length]):
                    best = length
                    break
        return best
