"""`TextStream`, the incremental detokenizer, against a byte-level mock tokenizer (no model)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from mock_tokenizer import EOS, MockTokenizer

from llava_cli.engine.streaming import Stats, TextStream, stats_line

EURO = "€".encode()  # three bytes: e2 82 ac
PIECES = [
    b" ",
    b"\n",
    b"Hi",
    b" there",
    EURO[:1],
    EURO[1:2],
    EURO[2:],
    EURO,
    "é".encode()[:1],
    "é".encode()[1:],
    b"!",
    b"  ",
]
TOKENIZER = MockTokenizer(PIECES)


def chunks_of(ids: list[int]) -> list[str]:
    stream = TextStream(TOKENIZER)
    chunks = [stream.push(token) for token in ids]
    return chunks + [stream.finish()]


def test_a_character_split_over_three_tokens_appears_once_whole():
    ids = TOKENIZER.ids(b"Hi", b" ", EURO[:1], EURO[1:2], EURO[2:], b"!")
    assert chunks_of(ids) == ["Hi", "", "", "", " €", "!", ""]


def test_an_incomplete_character_at_the_end_is_released_by_finish():
    ids = TOKENIZER.ids(b"Hi", EURO[:1])
    stream = TextStream(TOKENIZER)
    assert [stream.push(token) for token in ids] == ["Hi", ""]
    assert stream.finish() == "\ufffd"
    assert stream.text == "Hi\ufffd"


def test_leading_and_trailing_whitespace_are_never_handed_out():
    ids = TOKENIZER.ids(b"\n", b" ", b"Hi", b"  ", b"\n")
    assert chunks_of(ids) == ["", "", "Hi", "", "", ""]


def test_whitespace_inside_the_answer_is_released_with_the_text_after_it():
    ids = TOKENIZER.ids(b"Hi", b"\n", b"  ", b"!")
    assert chunks_of(ids) == ["Hi", "", "", "\n  !", ""]


def test_special_tokens_add_no_text():
    ids = [*TOKENIZER.ids(b"Hi"), EOS, *TOKENIZER.ids(b" there")]
    assert "".join(chunks_of(ids)) == "Hi there"


@given(st.lists(st.integers(min_value=1, max_value=len(PIECES)), max_size=30))
def test_joined_chunks_equal_the_stripped_decode_of_all_tokens(ids):
    stream = TextStream(TOKENIZER)
    joined = "".join(stream.push(token) for token in ids) + stream.finish()
    assert joined == TOKENIZER.decode(ids, skip_special_tokens=True).strip()
    assert stream.text == joined


def test_release_alone_trims_text_that_arrives_decoded():
    """A server's chunks are text already: only the whitespace rules apply (tokenizer None)."""
    stream = TextStream(tokenizer=None)
    assert [stream.release(text) for text in ["\n ", "Hello", " ", "world", " \n"]] == ["", "Hello", "", " world", ""]
    assert stream.text == "Hello world"


def test_stats_round_their_floats_and_the_verbose_line_shows_them():
    figures = Stats(
        prompt_tokens=20, cached_tokens=5, completion_tokens=7, ttft_s=0.123456, tokens_per_s=12.345
    ).as_dict()
    assert (figures["ttft_s"], figures["tokens_per_s"], figures["finish_reason"]) == (0.1235, 12.345, "stop")
    assert stats_line(figures) == (
        "stats: 20 prompt tokens (5 cached), first token 0.123s, 7 tokens at 12.3 tokens/s, 0.00s in all, peak memory 0 MB"
    )
