"""The n-gram proposer against a brute-force reference: longest suffix first (3, 2, 1 tokens), the
latest earlier occurrence of it, the tokens that followed it, cut to the limit."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from tgserve.core.config import ConfigError
from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.sequence import Sequence
from tgserve.core.shape_constraints import ShapeConstraints
from tgserve.core.speculation import make_proposer
from tgserve.core.speculation.ngram import NgramProposer


def sequence(ids: list[int], num_prompt: int | None = None) -> Sequence:
    request = GenerationRequest(list(ids), SamplingParams(), StoppingParams(max_new_tokens=64))
    return Sequence(0, request, list(ids), num_prompt or len(ids), len(ids) + 64)


def reference(ids: list[int], limit: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Scan every earlier position, the latest first, for each suffix size, longest first."""
    for size in range(min(max_ngram, len(ids)), min_ngram - 1, -1):
        suffix = ids[len(ids) - size:]
        for end in range(len(ids) - 2, size - 2, -1):
            if ids[end + 1 - size:end + 1] == suffix:
                return ids[end + 1:end + 1 + limit]
    return []


def test_latest_occurrence_of_the_longest_suffix():
    proposer = NgramProposer(4)
    # "5 6" occurs twice before the end: the latest is followed by 9 9; "4 5 6" only at the start.
    assert proposer.propose(sequence([4, 5, 6, 7, 8, 1, 5, 6, 9, 9, 2, 4, 5, 6]), 4) == [7, 8, 1, 5]
    assert proposer.propose(sequence([1, 5, 6, 7, 8, 1, 5, 6, 9, 9, 2, 3, 5, 6]), 4) == [9, 9, 2, 3]
    assert proposer.propose(sequence([1, 2, 3, 4]), 4) == []  # nothing repeats
    assert proposer.propose(sequence([7, 7]), 4) == [7]  # the match's follower runs into the suffix


def test_the_limit_and_the_room_cut_the_proposal():
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    assert NgramProposer(2).propose(sequence(ids), 5) == [3, 4]
    assert NgramProposer(5).propose(sequence(ids), 1) == [3]
    assert NgramProposer(5).propose(sequence(ids), 0) == []


def test_proposed_tokens_under_verification_are_not_matched():
    seq = sequence([1, 2, 3, 9, 1, 2])
    seq.token_ids += [3, 3]  # last step's proposals, not yet accepted
    seq.num_proposed_tokens = 2
    assert NgramProposer(3).propose(seq, 3) == [3, 9, 1]


def test_the_index_follows_accepted_tokens():
    """Propose, accept a few tokens, propose again: the same answers as the brute force each time,
    with the prompt indexed in bulk and the accepted tokens one by one."""
    rng = random.Random(0)
    ids = [rng.randrange(6) for _ in range(40)]
    seq = sequence(ids)
    proposer = NgramProposer(3)
    for _ in range(30):
        assert proposer.propose(seq, 3) == reference(seq.token_ids, 3)
        assert seq.proposer_state.num_indexed == len(seq.token_ids) - 1
        seq.token_ids += [rng.randrange(6) for _ in range(rng.randrange(1, 5))]


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 5), min_size=1, max_size=60), limit=st.integers(1, 6),
       sizes=st.sampled_from([(1, 1), (2, 1), (3, 1), (3, 2), (2, 2), (3, 3)]), split=st.integers(0, 60))
def test_equals_the_brute_force(ids, limit, sizes, split):
    """Whatever the history, and whether the index was built in one go or in two parts."""
    max_ngram, min_ngram = sizes
    proposer = NgramProposer(limit, max_ngram, min_ngram)
    seq = sequence(ids[:max(1, min(split, len(ids)))])
    proposer.propose(seq, limit)
    seq.token_ids = list(ids)
    assert proposer.propose(seq, limit) == reference(ids, limit, max_ngram, min_ngram)


def test_large_ids_still_match():
    ids = [151_000, 2_000_000, 151_643, 7, 151_000, 2_000_000]
    assert NgramProposer(2).propose(sequence(ids), 2) == [151_643, 7]


def test_make_proposer():
    assert make_proposer(None) is None and make_proposer(0) is None
    proposer = make_proposer(3, ShapeConstraints(prefill_token_buckets=(16, 32)))
    assert isinstance(proposer, NgramProposer) and proposer.num_tokens == 3 and proposer.method == "n-gram"
    with pytest.raises(ConfigError, match=r"^`--speculate 2` needs .* which the gaudi backend does not support"):
        make_proposer(2, ShapeConstraints(supports_chunked_prefill=False), "gaudi")
    assert make_proposer(0, ShapeConstraints(supports_chunked_prefill=False), "gaudi") is None
    with pytest.raises(ValueError):
        NgramProposer(2, max_ngram=4)
