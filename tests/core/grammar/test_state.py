"""GrammarState on the demo tokenizer, without an engine: the rows it fills for proposed ids, that the
matcher ends where it began, its end and its error. Oracle: fresh matchers advanced by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tgserve.checkpoints.demo_tokenizer import IM_END, build_demo_tokenizer, special_token_ids
from tgserve.core.grammar import GrammarSpec, compile_grammar, make_grammar_tokenizer
from tgserve.core.grammar.state import NO_NEXT_TOKEN, GrammarState
from tgserve.core.token_bitmask import num_words

NUM_LOGITS = 2048


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


@pytest.fixture(scope="module")
def eos(tokenizer) -> int:
    return special_token_ids(tokenizer)[IM_END]


@pytest.fixture(scope="module")
def animals(tokenizer, eos):
    grammar_tokenizer = make_grammar_tokenizer(tokenizer.to_str(), NUM_LOGITS, [eos])
    return compile_grammar(grammar_tokenizer, GrammarSpec.regex("(the|a) (cat|dog) (ran|sat)"))


def _expected_mask(compiled, tokens) -> torch.Tensor:
    matcher = compiled.new_matcher()
    assert matcher.consume_tokens(list(tokens))
    words = torch.from_numpy(np.frombuffer(matcher.compute_bitmask(), dtype=np.int32).copy())
    assert not words[num_words(NUM_LOGITS):].any()  # the library's buffer may be longer; nothing past the logits
    return words[:num_words(NUM_LOGITS)]


def _fill(states_and_proposed, num_rows) -> torch.Tensor:
    bitmask = torch.full((num_rows, num_words(NUM_LOGITS)), -1, dtype=torch.int32)
    jobs, row = [], 0
    for state, proposed in states_and_proposed:
        jobs.append((state, proposed, row))
        row += len(proposed) + 1
    GrammarState.fill_allowed(jobs, bitmask)
    return bitmask


def test_rows_after_proposed_ids_are_the_masks_after_them_and_the_matcher_is_left_as_it_was(animals, tokenizer):
    tokens = tokenizer.encode("the cat").ids
    assert len(tokens) >= 2
    refused = tokenizer.encode("7").ids[0]
    state = GrammarState(animals)
    other = GrammarState(animals)
    bitmask = _fill([(state, [tokens[0], tokens[1], refused, tokens[0]]), (other, [])], 6)
    assert torch.equal(bitmask[0], _expected_mask(animals, []))
    assert torch.equal(bitmask[1], _expected_mask(animals, tokens[:1]))
    assert torch.equal(bitmask[2], _expected_mask(animals, tokens[:2]))
    assert (bitmask[3:5] == -1).all()  # after the refused id: left allowing all, verification drops them
    assert torch.equal(bitmask[5], _expected_mask(animals, []))
    again = _fill([(state, [])], 1)  # nothing stayed consumed
    assert torch.equal(again[0], _expected_mask(animals, []))
    assert state.error is None and other.error is None


def test_complete_after_the_text_and_eos(animals, tokenizer, eos):
    state = GrammarState(animals)
    for token in tokenizer.encode("a dog sat").ids:
        assert not state.is_complete
        state.on_accept(token)
    assert state.is_complete  # only EOS may follow
    state.on_accept(eos)
    assert state.is_complete and state.error is None


def test_a_refused_token_is_an_error_naming_the_position(animals, tokenizer):
    state = GrammarState(animals)
    state.on_accept(tokenizer.encode("a").ids[0])
    state.on_accept(tokenizer.encode("7").ids[0])
    assert state.error.startswith(f"{NO_NEXT_TOKEN} after 1 generated tokens (")
    bitmask = _fill([(state, [])], 1)
    assert (bitmask == -1).all()  # a state in error fills nothing; the engine has already failed it
