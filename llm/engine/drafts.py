"""Prompt-lookup drafts for speculative decoding, without a draft model.

Answers that copy their input (a RAG answer quoting its context, an extraction, a summary, a code edit, a
``/toil`` value) repeat runs of tokens that already occur in the prompt. When the last few tokens of an answer
occur in its prompt, the tokens that followed them there are proposed as a draft; the
scheduler decodes the draft in the same batch as everything else and keeps the longest prefix that the model's
own sampling reproduces, so the output is exactly what the model would have written token by token.
"""

from __future__ import annotations

MIN_NGRAM, MAX_NGRAM = 3, 5
PAUSE = 16  # steps without drafting after a draft is not kept in full


class PromptLookup:
    """The n-gram index of one sequence's prompt, the answer so far, and the draft length.

    The index maps each n-gram (n from 3 to 5) to the position of the token that followed its latest occurrence,
    so a lookup costs a dict access whatever the context length. The draft length adapts (``feedback``), so free
    chat, where drafts are often wrong, costs almost nothing and copying runs at full length."""

    def __init__(self, prompt: list[int], limit: int):
        self.tokens: list[int] = list(prompt)
        self.limit = limit
        self.length = 2  # grows while drafts are kept
        self._paused = 0
        # Only the prompt is indexed: what an answer copies is its input. A model repeating its own phrases (small
        # models ramble) would otherwise draft from itself all through free chat and lose more than it gains.
        self._index: dict[tuple[int, ...], int] = {}
        for follower in range(MIN_NGRAM, len(prompt)):
            for n in range(MIN_NGRAM, min(MAX_NGRAM, follower) + 1):
                self._index[tuple(prompt[follower - n:follower])] = follower

    def extend(self, tokens: list[int]) -> None:
        """Append the answer's tokens (looked up as the suffix, never indexed as a source)."""
        self.tokens.extend(tokens)

    def draft(self, most: int) -> list[int]:
        """Tokens that followed the latest earlier occurrence of the longest matching suffix (at most ``most``)."""
        size = min(self.length, most)
        if self._paused:
            self._paused -= 1
            return []
        if size <= 0:
            return []
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(self.tokens) >= n:
                follower = self._index.get(tuple(self.tokens[-n:]))
                if follower is not None:
                    return self.tokens[follower:follower + size]
        return []

    def feedback(self, proposed: int, accepted: int) -> None:
        """Adapt the draft length to how much of the last draft the model kept: a whole draft kept doubles it;
        any rejection halves it and pauses drafting for a while (on a CPU, checking a draft token costs most of
        what decoding it alone would, so only runs the model reproduces in full pay)."""
        if proposed and accepted == proposed:
            self.length = min(self.limit, self.length * 2)
        elif proposed:
            self.length = max(1, self.length // 2)
            self._paused = PAUSE
