"""What goes into the next decode step: a cost model of one ``llama_decode``, and the step planned with it.

A step of n tokens costs about ``a + b*n``: ``a`` is what every pass pays whatever it carries (reading the weights,
launching kernels), ``b`` each token's own compute. On a GPU ``a`` dominates until hundreds of tokens, so putting
several prompts and every generating stream into one step costs hardly more than one of them. On a CPU ``b``
dominates as soon as a step holds a prompt (the embedded model on 2 cores, fitted: ``a`` about 9 ms, ``b`` about
4.4 ms), and then a step that prefills four prompts together gives all four their first token when the last of
them is done; one prompt per step gives the first its token after one prefill, the second after two, and the last
only the extra passes later. So the plan follows one rule everywhere: work joins a step when the delay it adds to the
prompts already in it (their count times ``b`` times its tokens) is less than what a step of its own would add to
the prompts it holds up (``a`` for each). Prompts are served oldest first, and the generating streams never go more
than ``LLM_BATCH_TOKENS`` prefilled tokens without a token of their own (the same bound as a chunk beside them had
before).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BUCKETS = 13  # step sizes by power of two: 1, 2-3, 4-7, ..., 4096 and more
WEIGHT = 0.2  # a new duration's weight in its size's running mean


class StepCost:
    """``a + b*n`` fitted to the recent durations of decode steps, one running mean per step size (powers of two),
    so that a long run of equal steps (steady decoding) does not wash out what other sizes cost."""

    def __init__(self, fixed: float | None = None, per_token: float | None = None):
        self._tokens = [0.0] * BUCKETS  # running mean step size in each bucket (0: none seen)
        self._seconds = [0.0] * BUCKETS
        self._line = None if fixed is None or per_token is None else (fixed, per_token)
        self._pinned = self._line is not None  # a given cost (tests, a measured machine) is not refitted
        self._changed = False

    def observe(self, tokens: int, seconds: float) -> None:
        """One decode step of ``tokens`` took ``seconds``."""
        if tokens <= 0 or seconds <= 0 or self._pinned:
            return
        bucket = min(tokens.bit_length() - 1, BUCKETS - 1)
        if self._tokens[bucket] == 0:
            self._tokens[bucket], self._seconds[bucket] = float(tokens), seconds
        else:
            self._tokens[bucket] += WEIGHT * (tokens - self._tokens[bucket])
            self._seconds[bucket] += WEIGHT * (seconds - self._seconds[bucket])
        self._changed = True

    def line(self) -> tuple[float, float] | None:
        """(a, b) in seconds, or None until steps of two sizes were seen. Both are kept >= 0: noise can tilt the
        line, and then the plan behaves as if that part were free."""
        if self._changed:
            self._changed = False
            points = [(n, t) for n, t in zip(self._tokens, self._seconds, strict=True) if n]
            if len(points) >= 2:
                mean_n = sum(n for n, _ in points) / len(points)
                mean_t = sum(t for _, t in points) / len(points)
                spread = sum((n - mean_n) ** 2 for n, _ in points)
                slope = max(0.0, sum((n - mean_n) * (t - mean_t) for n, t in points) / spread)
                self._line = (max(0.0, mean_t - slope * mean_n), slope)
        return self._line

    def worth_joining(self, waiting: int, tokens: int, behind: int = 1) -> bool:
        """Whether ``tokens`` more in a step that ``waiting`` prompts wait for delay them less than a step of their
        own would delay the ``behind`` prompts it holds up (those tokens' own and every later one); yes while the
        cost is unknown, which batches as much as it can."""
        line = self.line()
        return line is None or waiting * line[1] * tokens < behind * line[0]

    def as_stats(self) -> dict[str, float | None]:
        line = self.line()
        return {"step_fixed_seconds": line and line[0], "step_token_seconds": line and line[1]}


@dataclass
class Plan:
    """One step: whether the generating streams take part, and the prompt chunks as (prompt index, tokens)."""

    decode: bool
    chunks: list[tuple[int, int]] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return sum(tokens for _, tokens in self.chunks)


def plan_step(generating: int, prompts: list[int], stalled: int, budget: int, cost: StepCost) -> Plan:
    """The next step's work.

    ``generating``: streams waiting for their next token; ``prompts``: prompt tokens still to prefill, one entry per
    prompt, oldest first; ``stalled``: prompt tokens decoded since the generating streams' last token; ``budget``:
    prompt tokens between two of their tokens (``LLM_BATCH_TOKENS``), or in one step when none is generating. A
    prompt that fits a whole budget is not split to fill what is left of one: it waits for a step with room."""
    room = budget - stalled if generating else budget
    chunks: list[tuple[int, int]] = []
    for index, left in enumerate(prompts):
        take = left if left <= room else room if left > budget else 0
        if take <= 0 or (chunks and not cost.worth_joining(len(chunks), take, len(prompts) - index)):
            break
        chunks.append((index, take))
        room -= take
    decode = generating > 0 and (not chunks or cost.worth_joining(len(chunks), generating))
    return Plan(decode, chunks)
