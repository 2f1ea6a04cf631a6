"""N-gram proposals (prompt lookup): guess that a sequence goes on the way it went after the last
time its latest tokens appeared, in its own prompt or output.

For n from `max_ngram` down to `min_ngram`, the last n accepted tokens are looked up among the earlier
n-grams of the same sequence; the most recent earlier occurrence wins (nearby text predicts better
than the start of a long prompt), and the tokens that followed it are the proposal. TGI matches only
the last token (n = 1) and takes its first occurrence; transformers' `prompt_lookup_num_tokens`
tries n = 2 then 1 and also takes the first.

Cost: each sequence keeps a dict per n from an n-gram to where it last ended, filled as its tokens
are accepted (the prompt on its first proposal, then only the tokens accepted since), so a proposal
is `max_ngram` dict lookups and one list slice whatever the sequence's length: no scan per step.
Accepted tokens never change, so the index never needs rebuilding; it lives on the sequence
(`Sequence.proposer_state`) and goes with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tgserve.core.sequence import Sequence
from tgserve.core.speculation.acceptance import Proposer

METHOD = "n-gram"  # the method name TGI logs ("Using speculation n-gram with N input ids.")
_TOKEN_BITS = 21  # an n-gram key packs each id into 21 bits (vocabularies reach ~256k ids)
_MAX_NGRAM = 3  # 3 x 21 bits fit the int64 lanes of the vectorised prompt indexing
_BULK_TOKENS = 16  # index in numpy above this many new positions (a prompt), in Python below (a step)


@dataclass(slots=True)
class NgramIndex:
    """One sequence's n-grams, host side, built by `NgramProposer` on the engine thread."""

    # by_size[i]: packed key of an n-gram of size min_ngram + i -> position of its last token (the latest)
    by_size: list[dict[int, int]]
    num_indexed: int = 0  # the n-grams ending at positions < num_indexed are in the dicts


class NgramProposer(Proposer):
    """Proposes up to `num_tokens` tokens per step from n-gram matches (`tgserve.core.speculation.Proposer`)."""

    method = METHOD

    def __init__(self, num_tokens: int, max_ngram: int = 3, min_ngram: int = 1):
        """num_tokens: --speculate; max_ngram / min_ngram: the longest and shortest suffix looked up."""
        if not 1 <= min_ngram <= max_ngram <= _MAX_NGRAM:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram <= {_MAX_NGRAM}, got {min_ngram}, {max_ngram}")
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Up to min(num_tokens, max_tokens) ids that followed the latest earlier occurrence of the
        longest suffix (max_ngram down to min_ngram tokens) of `seq`'s accepted tokens; [] for none."""
        limit = min(self.num_tokens, max_tokens)
        if limit <= 0:
            return []
        ids = seq.token_ids
        num_accepted = len(ids) - seq.num_proposed_tokens
        index = seq.proposer_state
        if not isinstance(index, NgramIndex):
            index = seq.proposer_state = NgramIndex([{} for _ in range(self.min_ngram, self.max_ngram + 1)])
        # Only n-grams ending before the last token are indexed: a match must have a token after it.
        self._extend(index, ids, num_accepted - 1)
        for size in range(min(self.max_ngram, num_accepted), self.min_ngram - 1, -1):
            end = index.by_size[size - self.min_ngram].get(pack(ids[num_accepted - size:num_accepted]))
            if end is not None:
                return ids[end + 1:min(end + 1 + limit, num_accepted)]
        return []

    def _extend(self, index: NgramIndex, ids: list[int], upto: int) -> None:
        """Add the n-grams ending at positions [index.num_indexed, upto) of `ids`, later ones winning:
        in Python for the few tokens a step accepts, vectorised for a whole prompt."""
        first = index.num_indexed
        if upto - first > _BULK_TOKENS:
            self._extend_bulk(index, ids, upto)
            return
        for end in range(first, upto):
            for size, table in enumerate(index.by_size, start=self.min_ngram):
                if size > end + 1:
                    break
                table[pack(ids[end + 1 - size:end + 1])] = end
        index.num_indexed = max(first, upto)

    def _extend_bulk(self, index: NgramIndex, ids: list[int], upto: int) -> None:
        """`_extend` over many positions: each size's keys in numpy, then one dict update (in position
        order, so the latest occurrence of a key is the one kept)."""
        first = index.num_indexed
        low = max(0, first - self.max_ngram + 1)
        window = np.asarray(ids[low:upto], dtype=np.int64)
        for size, table in enumerate(index.by_size, start=self.min_ngram):
            start = max(first, size - 1)  # the first end position with a whole n-gram before it
            if start >= upto:
                continue
            keys = np.zeros(upto - start, dtype=np.int64)
            for j in range(size):  # token j of the n-gram ending at `end` sits at end - size + 1 + j
                offset = start - size + 1 + j - low
                keys = (keys << _TOKEN_BITS) | window[offset:offset + len(keys)]
            table.update(zip(keys.tolist(), range(start, upto)))
        index.num_indexed = upto


def pack(ngram: list[int]) -> int:
    """An n-gram's ids as one int key. Ids at or above 2**21 share bits with their neighbours, so two
    n-grams may share a key: that only costs a worse guess, never a wrong token (all are verified)."""
    key = 0
    for token_id in ngram:
        key = (key << _TOKEN_BITS) | token_id
    return key
