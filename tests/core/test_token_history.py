"""TokenHistory: the device rows of penalised sequences equal their token ids, written incrementally.

Reference: the rows rebuilt from each sequence's Python `token_ids` (the pre-issue-11 construction),
checked after every change: new accepted tokens, proposed tokens replaced after a rollback, finished
sequences whose rows are reused, the buffer outgrowing its initial rows and width.
"""
from __future__ import annotations

import random

import torch

from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.sequence import Sequence, SequenceStatus
from tgserve.core.token_history import TokenHistory

PAD = 1000


def _seq(request_id: int, prompt: list[int]) -> Sequence:
    request = GenerationRequest(prompt, SamplingParams(repetition_penalty=1.2), StoppingParams(100))
    return Sequence(request_id, request, list(prompt), len(prompt), len(prompt) + 100)


def _expected(seqs: list[Sequence], num_ids: list[int]) -> torch.Tensor:
    width = max(num_ids)
    return torch.tensor([s.token_ids[:n] + [PAD] * (width - n) for s, n in zip(seqs, num_ids)])


def test_rows_follow_accepted_and_proposed_tokens_through_rollbacks_and_reuse():
    rng = random.Random(0)
    history = TokenHistory(torch.device("cpu"), PAD, num_rows=2, width=4)
    live = [_seq(i, [rng.randrange(PAD) for _ in range(rng.randrange(1, 9))]) for i in range(3)]
    next_id = 3
    for _ in range(60):
        for seq in live:  # a step: drop last step's proposals, accept 1..3 tokens, propose 0..3
            del seq.token_ids[len(seq.token_ids) - seq.num_proposed_tokens:]
            seq.token_ids += [rng.randrange(PAD) for _ in range(rng.randrange(1, 4))]
            seq.num_proposed_tokens = rng.randrange(0, 4)
            seq.token_ids += [rng.randrange(PAD) for _ in range(seq.num_proposed_tokens)]
        rows, num_ids = [], []
        for seq in live:  # one row per sampled position, as the runner asks; some with no history
            for j in range(seq.num_proposed_tokens + 1):
                rows.append(seq)
                num_ids.append(0 if seq.request_id % 4 == 3 else len(seq.token_ids) - seq.num_proposed_tokens + j)
        if max(num_ids) == 0:
            continue
        assert torch.equal(history.rows(rows, num_ids), _expected(rows, num_ids))
        if rng.random() < 0.3:  # a sequence finishes, a new one arrives (and may reuse its row)
            live.pop(rng.randrange(len(live))).status = SequenceStatus.FINISHED
            live.append(_seq(next_id, [rng.randrange(PAD) for _ in range(rng.randrange(1, 9))]))
            next_id += 1
    assert next_id > 6  # rows were reused
