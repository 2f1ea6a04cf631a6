"""`StopMatcher` against a brute-force reference: stop at the first piece after which any stop occurs
anywhere in the concatenated text, whatever the stops' lengths and however the text is cut."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tgserve.core.stop_sequences import StopMatcher

# Few distinct characters, so stops recur and overlap; multi-byte ones as the tokenizer emits them.
ALPHABET = "ab é你🌞\n"


def first_stopping_piece(pieces: list[str], stops: tuple[str, ...]) -> int | None:
    """Brute force: the index of the first piece after which some stop is in the text so far."""
    text = ""
    for i, piece in enumerate(pieces):
        text += piece
        if any(stop in text for stop in stops):
            return i
    return None


def fed_until_stop(pieces: list[str], stops: tuple[str, ...]) -> int | None:
    matcher = StopMatcher(stops)
    return next((i for i, piece in enumerate(pieces) if matcher.feed(piece)), None)


@st.composite
def pieces_and_stops(draw):
    """Up to 400 pieces of 0-4 characters (token texts; "" where a partial character is withheld), so
    often over 256 characters in all, and 1-4 stops: substrings of the text (any length, so often over
    256 characters, and ending in any piece at any offset) or short free ones."""
    num_pieces = draw(st.integers(1, 400))  # drawn first: a plain st.lists rarely grows this long
    pieces = draw(st.lists(st.text(alphabet=ALPHABET, max_size=4), min_size=num_pieces, max_size=num_pieces))
    text = "".join(pieces) or "a"
    substring = st.tuples(st.integers(0, len(text) - 1), st.integers(1, len(text))).map(
        lambda span: text[span[0]:span[0] + span[1]])
    stops = draw(st.lists(st.one_of(substring, st.text(alphabet=ALPHABET, min_size=1, max_size=8)),
                          min_size=1, max_size=4))
    return pieces, tuple(stops)


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(pieces_and_stops())
def test_stops_at_the_first_piece_that_completes_any_stop(case):
    """Oracle: `first_stopping_piece`, which searches the whole text again after every piece."""
    pieces, stops = case
    assert fed_until_stop(pieces, stops) == first_stopping_piece(pieces, stops)


def test_a_stop_longer_than_any_fixed_window_matches_when_fed_token_by_token():
    """Oracle: the stop is built to first complete at piece 150 (300 characters of 2-character pieces)."""
    pieces = [f"{i % 10}{chr(65 + i % 26)}" for i in range(200)]
    stop = "".join(pieces[1:151])[1:]  # starts mid-piece, 299 characters
    assert len(stop) > 256
    assert first_stopping_piece(pieces, (stop,)) == 150
    assert fed_until_stop(pieces, (stop,)) == 150
