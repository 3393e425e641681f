"""Prompt-lookup drafts: what is proposed, and how the draft length adapts."""

from __future__ import annotations

from llm.drafts import PAUSE, PromptLookup


def test_the_tokens_that_followed_the_latest_earlier_occurrence_are_proposed():
    lookup = PromptLookup([1, 2, 3, 4, 5, 6, 9, 2, 3], limit=4)
    lookup.length = 3
    assert lookup.draft(10) == [4, 5, 6]  # "2 3" occurred before, followed by 4 5 6
    lookup.extend([7, 8])
    assert lookup.draft(10) == []  # "3 7 8" never occurred
    lookup.extend([2, 3, 4])
    assert lookup.draft(10) == [5, 6, 9]  # the longest match, "2 3 4", wins
    assert lookup.draft(2) == [5, 6]  # never more than asked for


def test_the_suffix_itself_is_never_its_own_match():
    assert PromptLookup([5, 6, 7, 8], limit=4).draft(4) == []


def test_drafts_grow_while_kept_and_pause_after_a_rejection():
    lookup = PromptLookup(list(range(20)) * 2, limit=8)
    assert lookup.length == 2  # a first draft is short
    lookup.feedback(2, 2)
    lookup.feedback(4, 4)
    lookup.feedback(8, 8)
    assert lookup.length == 8  # capped by the setting
    lookup.feedback(8, 5)  # any rejection halves the length and pauses drafting
    assert lookup.length == 4
    assert [lookup.draft(8) for _ in range(PAUSE)] == [[]] * PAUSE
    assert len(lookup.draft(8)) == 4
