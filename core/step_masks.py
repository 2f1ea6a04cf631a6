"""The allowed-token masks of one step's sampled rows, filled on the host by the requests' masking states.

One int32 buffer [rows, ceil(vocab / 32)] lives across steps (grown when a step has more constrained
rows than any before) and is filled in place; only the rows of requests that hold a `MaskingState`
get a mask, so the sampler touches those rows alone, and a step without one builds nothing.
"""
from __future__ import annotations

import torch

from tgserve.core.request_state import MaskingState
from tgserve.core.token_bitmask import num_words


class StepMasks:
    def __init__(self, vocab_size: int, device: torch.device):
        self.device = device
        self._host = torch.empty(0, num_words(vocab_size), dtype=torch.int32)  # [max rows seen, words]

    def build(self, items: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(int32 [G, words] masks on the device, int64 [G] their sampled rows or None when every row
        has one) for the step's sampling `items` (`ScheduledSequence`s, plan order); (None, None) when
        no request of the step holds a masking state."""
        jobs: dict[type, list] = {}  # masking state class -> (state, proposed, row in the masks)
        rows: list[int] = []  # sampled row of each mask
        num_rows = 0
        for item in items:
            seq = item.seq
            masking = [state for state in seq.states if isinstance(state, MaskingState)]
            if masking:
                proposed = seq.token_ids[len(seq.token_ids) - seq.num_proposed_tokens:][:item.num_sampled - 1]
                for state in masking:
                    jobs.setdefault(type(state), []).append((state, proposed, len(rows)))
                rows.extend(range(num_rows, num_rows + item.num_sampled))
            num_rows += item.num_sampled
        if not rows:
            return None, None
        bits = self._rows(len(rows))
        for i, (state_class, group) in enumerate(jobs.items()):
            target = bits if i == 0 else torch.full_like(bits, -1)  # a second kind of mask narrows the first
            state_class.fill_allowed(group, target)
            if i:
                bits &= target
        row_index = None if len(rows) == num_rows else torch.tensor(rows, dtype=torch.int64).to(self.device)
        return bits.to(self.device), row_index

    def _rows(self, num_rows: int) -> torch.Tensor:
        """The first `num_rows` rows of the persistent buffer, every bit set (every id allowed)."""
        if self._host.shape[0] < num_rows:
            self._host = torch.empty(num_rows, self._host.shape[1], dtype=torch.int32)
        rows = self._host[:num_rows]
        rows.fill_(-1)
        return rows
