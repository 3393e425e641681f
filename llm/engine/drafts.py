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
# Tokens in a row the answer must have copied from the prompt by itself before a draft is proposed. A suffix that
# merely occurs in the prompt (a common phrase) is a poor bet in free chat, and a wrong draft costs a pass of its
# own beside other streams (llama.cpp's split_equal takes the same number of tokens of each stream per pass).
FOLLOWED = 1


class PromptLookup:
    """The n-gram index of one sequence's prompt, the answer so far, and the draft length.

    The index maps each n-gram (n from 3 to 5) to the position of the token that followed its latest occurrence,
    so a lookup costs a dict access whatever the context length. The draft length adapts (``feedback``), so free
    chat, where drafts are often wrong, costs almost nothing and copying runs at full length."""

    def __init__(self, prompt: list[int], limit: int):
        self.tokens: list[int] = list(prompt)
        self.limit = limit
        self.length = 2  # grows while drafts are kept
        self.followed = 0  # the answer's last tokens that were the prompt's continuation, in a row
        self._paused = 0
        # Only the prompt is indexed: what an answer copies is its input. A model repeating its own phrases (small
        # models ramble) would otherwise draft from itself all through free chat and lose more than it gains.
        self._index: dict[tuple[int, ...], int] = {}
        for follower in range(MIN_NGRAM, len(prompt)):
            for n in range(MIN_NGRAM, min(MAX_NGRAM, follower) + 1):
                self._index[tuple(prompt[follower - n:follower])] = follower
        # Where the prompt continues the answer's current suffix (a conversation's prompt ends as earlier turns began)
        self._next: int | None = self._continuation()

    def extend(self, tokens: list[int]) -> None:
        """Append the answer's tokens (looked up as the suffix, never indexed as a source), counting how many in a
        row were what the prompt had next."""
        for token in tokens:
            self.followed = self.followed + 1 if self._next is not None and self.tokens[self._next] == token else 0
            self.tokens.append(token)
            self._next = self._continuation()

    def _continuation(self) -> int | None:
        """The position after the latest earlier occurrence of the longest matching suffix (3 to 5 tokens)."""
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(self.tokens) >= n:
                follower = self._index.get(tuple(self.tokens[-n:]))
                if follower is not None:
                    return follower
        return None

    def draft(self, most: int) -> list[int]:
        """What the prompt has next after the answer's suffix (at most ``most`` tokens), once the answer is copying
        (``FOLLOWED``)."""
        size = min(self.length, most)
        if self._paused:
            self._paused -= 1
            return []
        if size <= 0 or self._next is None or self.followed < FOLLOWED:
            return []
        return self.tokens[self._next:self._next + size]

    def feedback(self, proposed: int, accepted: int) -> None:
        """Adapt the draft length to how much of the last draft the model kept: a whole draft kept doubles it;
        any rejection halves it and pauses drafting for a while (on a CPU, checking a draft token costs most of
        what decoding it alone would, so only runs the model reproduces in full pay)."""
        if proposed and accepted == proposed:
            self.length = min(self.limit, self.length * 2)
        elif proposed:
            self.length = max(1, self.length // 2)
            self._paused = PAUSE
