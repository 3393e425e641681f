"""Token budgets: cuts fall on sentence (or entry) boundaries, counted with the injected tokenizer."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from rag.budget import Section, assemble, fit_text, fit_units, sentences


def words(text: str) -> int:
    return len(text.split())


def test_sentences_round_trip_and_split_at_punctuation_and_lines() -> None:
    text = 'Hello world. Is it "done?" Yes!  Now a list:\n- item one\n\nLast… really'
    parts = list(sentences(text))
    assert "".join(parts) == text
    assert parts == ["Hello world. ", 'Is it "done?" ', "Yes!  ", "Now a list:\n", "- item one\n\n",
                     "Last… ", "really"]


def test_fit_text_cuts_at_a_sentence_boundary() -> None:
    text = "One two three. Four five six. Seven eight nine."
    assert fit_text(text, 7, words) == ("One two three. Four five six.", True)
    assert fit_text(text, 9, words) == (text, False)
    assert fit_text(text, 2, words) == ("One two", True)  # a single oversized sentence: word boundary
    assert fit_text(text, 0, words) == ("", True)


def test_fit_units_trusts_the_joined_count() -> None:
    """A tokenizer that is not additive (the join costs extra) still ends within the budget."""
    def costly(text: str) -> int:
        return len(text.split()) + text.count("\n") * 5
    text, cut = fit_units(["a b\n", "c d\n", "e f"], 6, costly, joiner="")
    assert costly(text) <= 6 and cut


def test_assemble_respects_priority_and_budget() -> None:
    sections = [
        Section("User:", list(sentences("Alpha beta. Gamma delta.")), label="user"),
        Section("Feed:", ["- entry one is here", "- entry two is here", "- entry three"], joiner="\n",
                label="feed"),
        Section("Knowledge:", list(sentences("Never fits here.")), label="kb"),
    ]
    context, kept = assemble(sections, 14, words)
    assert context == "User:\nAlpha beta. Gamma delta.\n\nFeed:\n- entry one is here"
    assert words(context) <= 14
    assert [section.label for section in kept] == ["user", "feed"]
    assert [section.cut for section in sections] == [False, True, True]


@given(text=st.text(max_size=400), budget=st.integers(min_value=0, max_value=60))
def test_fit_text_is_a_prefix_within_budget(text: str, budget: int) -> None:
    fitted, cut = fit_text(text, budget, words)
    assert words(fitted) <= budget
    assert " ".join(text.split()).startswith(" ".join(fitted.split()))
    if not cut:
        assert fitted == text.strip()


def test_long_punctuation_runs_split_in_linear_time() -> None:
    started = time.monotonic()
    for text in ("." * 200_000 + "x", "?" * 100_000 + " tail", ")" * 100_000):
        assert "".join(sentences(text)) == text
    assert time.monotonic() - started < 1
