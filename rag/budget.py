"""Cutting context to a token budget at natural boundaries: sentences, feed entries, passages.

Budgets are in tokens, counted by the injected ``count_tokens``; text is never cut mid-sentence unless the
first sentence of the context is larger than the whole budget, and then at a word boundary. Counting is
done unit by unit and stops at the first unit that does not fit, so a 5 MB page costs no more than the
part that is kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

CountTokens = Callable[[str], int]

# A sentence ends after . ! ? … (and closing quotes/brackets) followed by whitespace, or at a line break.
# Only the last punctuation mark of a run can match, so long runs ("......") cost linear time.
_BOUNDARY = re.compile(r"[.!?…][\"'”’»)\]]*(?:\s+|\Z)|\n\s*")


def sentences(text: str) -> Iterator[str]:
    """Split text into sentences, each keeping its trailing whitespace, so joining them restores the text."""
    position = 0
    for match in _BOUNDARY.finditer(text):
        if match.end() > position:
            yield text[position:match.end()]
            position = match.end()
    if position < len(text):
        yield text[position:]


def fit_units(units: Iterable[str], budget: int, count_tokens: CountTokens, joiner: str = "",
              *, partial: bool = True) -> tuple[str, bool]:
    """The longest prefix of ``units`` (joined) within ``budget`` tokens, and whether anything was cut.

    When even the first unit is too large, ``partial`` allows its first words instead of nothing.
    """
    kept: list[str] = []
    used = 0
    cut = False
    for unit in units:
        cost = count_tokens(unit)
        if used + cost > budget:
            cut = True
            if not kept:
                return (_fit_words(unit, budget, count_tokens) if partial else ""), True
            break
        kept.append(unit)
        used += cost
    # Token counts are not exactly additive; trust the count of the joined text.
    while kept and count_tokens(joiner.join(kept).strip()) > budget:
        kept.pop()
        cut = True
    return joiner.join(kept).strip(), cut


def _fit_words(text: str, budget: int, count_tokens: CountTokens) -> str:
    """The longest word-boundary prefix of one oversized sentence that fits (binary search)."""
    words = text.split()
    low, high = 0, len(words)
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(" ".join(words[:middle])) <= budget:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


def fit_text(text: str, budget: int, count_tokens: CountTokens) -> tuple[str, bool]:
    """``text`` cut to ``budget`` tokens at a sentence boundary, and whether it was cut."""
    return fit_units(sentences(text), budget, count_tokens)


@dataclass
class Section:
    """One block of context: a header line naming where it comes from, and its units of text."""

    header: str
    units: Iterable[str]
    joiner: str = ""
    label: str = ""
    payload: object = None
    cut: bool = field(default=False, init=False)


def assemble(sections: list[Section], budget: int, count_tokens: CountTokens) -> tuple[str, list[Section]]:
    """Fill the budget with sections in priority order; returns the context and the sections kept."""
    blocks: list[str] = []
    kept: list[Section] = []
    for section in sections:
        remaining = budget - (count_tokens("\n\n".join(blocks) + "\n\n") if blocks else 0)
        header_cost = count_tokens(section.header + "\n")
        if remaining - header_cost <= 0:
            section.cut = True
            continue
        # Only the first block may be a fragment of a sentence: better than no context at all.
        body, section.cut = fit_units(section.units, remaining - header_cost, count_tokens, section.joiner,
                                      partial=not blocks)
        if not body:
            continue
        blocks.append(f"{section.header}\n{body}")
        kept.append(section)
    while blocks and count_tokens("\n\n".join(blocks)) > budget:
        blocks.pop()
        kept.pop().cut = True
    return "\n\n".join(blocks), kept
