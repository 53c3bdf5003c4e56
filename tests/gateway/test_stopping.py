import pytest

from junction.gateway.stopping import Stopping


@pytest.mark.parametrize(
    ("max_tokens", "stop", "pieces", "released", "reason", "text"),
    [
        # budget
        (3, [], ["a", "b", "c", "d"], ["a", "b", "c"], "length", "abc"),
        # a stop string inside one piece cuts the text there
        (10, ["\n\n"], ["Hi", " there\n\nBye"], ["Hi", " there"], "stop", "Hi there"),
        # a stop string split across pieces is held back, then cut
        (10, ["END"], ["one E", "N", "D more"], ["one ", "", ""], "stop", "one "),
        # a held-back prefix that turns out not to be a stop string is released
        (10, ["END"], ["one E", "x"], ["one ", "Ex"], None, "one Ex"),
        # several stop strings: the first one found ends it
        (10, ["b", "c"], ["a", "cb"], ["a", ""], "stop", "a"),
    ],
)
def test_stopping_table(max_tokens, stop, pieces, released, reason, text):
    stopping = Stopping(max_tokens, stop)
    out, last = [], None
    for piece in pieces:
        chunk, last = stopping(piece)
        out.append(chunk)
        if last:
            break
    assert out == released
    assert last == reason
    assert stopping.text == text


def test_end_of_sequence_releases_what_was_held_back():
    stopping = Stopping(10, ["ABC"])
    assert stopping("xA") == ("x", None)
    assert stopping("", eos=True) == ("A", "stop")
    assert stopping.text == "xA"


def test_multi_token_pieces_count_against_the_budget():
    stopping = Stopping(5)
    assert stopping("hello", tokens=3) == ("hello", None)
    assert stopping(" world", tokens=2) == (" world", "length")
    assert stopping.tokens == 5


@pytest.mark.parametrize(
    ("pieces", "released", "reason", "text"),
    [
        # a transcript ends "Assistant:\n": an answer that opens a next turn ends at once
        (["User", ": hi"], ["", ""], "stop", ""),
        (["Paris.", "\nUser:"], ["Paris.", ""], "stop", "Paris."),
        # "User" at the start is held back, released once it is not "User:"
        (["User", "s like"], ["", "Users like"], None, "Users like"),
        (["I think"], ["I think"], None, "I think"),
    ],
)
def test_a_stop_string_may_start_in_the_context(pieces, released, reason, text):
    stopping = Stopping(10, ["\nUser:"], context="\n")
    out, last = [], None
    for piece in pieces:
        chunk, last = stopping(piece)
        out.append(chunk)
        if last:
            break
    assert (out, last, stopping.text) == (released, reason, text)


def test_a_transcript_turn_ends_before_its_blank_line():
    stopping = Stopping(10, ["\n\nUser:", "\nUser:"], context="\n")
    for piece in ["Paris.", "\n", "\n", "User", ":"]:
        _, reason = stopping(piece)
    assert (stopping.text, reason) == ("Paris.", "stop")
