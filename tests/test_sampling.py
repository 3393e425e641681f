"""TextStream: UTF-8 split across tokens and stop strings never shown, even in part."""

from __future__ import annotations

from llm.engine import SamplingParams
from llm.engine.sampling import TextStream


def feed_all(stream: TextStream, pieces: list[bytes]) -> str:
    return "".join(stream.feed(piece) for piece in pieces) + stream.flush()


def test_multibyte_split_across_tokens():
    data = "café 😀 ok".encode()
    pieces = [data[i:i + 1] for i in range(len(data))]
    stream = TextStream(())
    outputs = [stream.feed(piece) for piece in pieces]
    assert "".join(outputs) + stream.flush() == "café 😀 ok"
    assert all("\ufffd" not in text for text in outputs)


def test_stop_string_across_pieces_is_cut_and_never_leaks():
    stream = TextStream(("<end>",))
    shown = [stream.feed(piece) for piece in [b"Hello <e", b"n", b"d> after"]]
    assert "".join(shown) == "Hello " and stream.stopped
    assert stream.flush() == ""
    assert "<" not in "".join(shown)


def test_false_alarm_prefix_is_released():
    assert feed_all(TextStream(("STOP",)), [b"ST", b"ART"]) == "START"


def test_sampling_params_from_mapping():
    params = SamplingParams.from_mapping({"temperature": 0, "stop": "x", "unknown": 1, "top_k": None})
    assert params.temperature == 0 and params.stop == ("x",) and params.top_k == SamplingParams().top_k


def test_the_earliest_stop_string_wins_and_is_named():
    stream = TextStream(("END", "e"))  # both complete in one piece: the one that comes first in the text wins
    assert feed_all(stream, [b"x", b"yz e END"]) == "xyz "
    assert stream.matched == "e"
    plain = TextStream(("END",))
    assert feed_all(plain, [b"no stop here"]) == "no stop here" and plain.matched is None
