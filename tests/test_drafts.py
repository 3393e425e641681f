"""Prompt-lookup drafts: what is proposed, and how the draft length adapts."""

from __future__ import annotations

from llm.engine.drafts import PAUSE, PromptLookup


def test_the_tokens_that_followed_a_match_in_the_prompt_are_proposed_once_the_answer_copies():
    lookup = PromptLookup([1, 2, 3, 4, 5, 6, 7, 8, 9], limit=4)
    lookup.length = 3
    lookup.extend([0, 2, 3])
    assert lookup.draft(10) == []  # "0 2 3" is not in the prompt, and two tokens are too weak a match
    lookup.extend([4])
    assert lookup.draft(10) == []  # "2 3 4" is, but the answer has not yet copied anything by itself
    lookup.extend([5])
    assert lookup.followed == 1
    assert lookup.draft(10) == [6, 7, 8]  # it wrote the 5 that followed "2 3 4": what follows "3 4 5" is proposed
    assert lookup.draft(2) == [6, 7]  # never more than asked for
    lookup.extend([6, 7, 8, 9])
    assert lookup.draft(10) == []  # the prompt ends there: nothing follows


def test_a_phrase_that_only_occurs_in_the_prompt_is_no_reason_to_draft():
    """Free chat: the answer's suffix matches the prompt now and then, and the model goes its own way."""
    lookup = PromptLookup([5, 1, 2, 3, 9, 7, 1, 2, 3, 4], limit=4)
    lookup.extend([8, 1, 2, 3])  # matches "1 2 3" (followed by 4 at its latest occurrence)
    assert lookup.draft(4) == []
    lookup.extend([6])  # the model did not write the 4
    assert lookup.followed == 0 and lookup.draft(4) == []


def test_the_answer_is_never_a_source():
    lookup = PromptLookup([1, 2, 3], limit=4)
    lookup.extend([7, 8, 9, 10, 7, 8, 9])
    assert lookup.draft(4) == []  # "7 8 9" repeats in the answer only


def test_drafts_grow_while_kept_and_pause_after_a_rejection():
    lookup = PromptLookup(list(range(40)), limit=8)
    lookup.extend([10, 11, 12, 13])
    assert lookup.draft(8) == [14, 15]  # a first draft is short
    lookup.feedback(2, 2)
    lookup.feedback(4, 4)
    lookup.feedback(8, 8)
    assert lookup.length == 8  # capped by the setting
    lookup.feedback(8, 5)  # any rejection halves the length and pauses drafting
    assert lookup.length == 4
    assert [lookup.draft(8) for _ in range(PAUSE)] == [[]] * PAUSE
    assert lookup.draft(8) == [14, 15, 16, 17]
