"""Prompt-lookup drafts: what is proposed, and how the draft length adapts."""

from __future__ import annotations

from llm.engine.drafts import PAUSE, PromptLookup


def test_the_tokens_that_followed_a_match_in_the_prompt_are_proposed():
    lookup = PromptLookup([1, 2, 3, 4, 5, 6, 7, 8, 9], limit=4)
    lookup.length = 3
    lookup.extend([0, 2, 3])
    assert lookup.draft(10) == []  # "0 2 3" is not in the prompt, and two tokens are too weak a match
    lookup.extend([4])
    assert lookup.draft(10) == [5, 6, 7]  # "2 3 4" is, followed by 5 6 7
    assert lookup.draft(2) == [5, 6]  # never more than asked for
    lookup.extend([5, 6, 7, 8, 9])
    assert lookup.draft(10) == []  # the prompt ends there: nothing follows


def test_the_answer_is_never_a_source():
    lookup = PromptLookup([1, 2, 3], limit=4)
    lookup.extend([7, 8, 9, 10, 7, 8, 9])
    assert lookup.draft(4) == []  # "7 8 9" repeats in the answer only


def test_drafts_grow_while_kept_and_pause_after_a_rejection():
    lookup = PromptLookup(list(range(40)), limit=8)
    lookup.extend([10, 11, 12])
    assert lookup.draft(8) == [13, 14]  # a first draft is short
    lookup.feedback(2, 2)
    lookup.feedback(4, 4)
    lookup.feedback(8, 8)
    assert lookup.length == 8  # capped by the setting
    lookup.feedback(8, 5)  # any rejection halves the length and pauses drafting
    assert lookup.length == 4
    assert [lookup.draft(8) for _ in range(PAUSE)] == [[]] * PAUSE
    assert lookup.draft(8) == [13, 14, 15, 16]
