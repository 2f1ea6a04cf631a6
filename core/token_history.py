"""The token ids of the sequences that use penalties, kept on the device and extended in place.

The repetition and frequency penalties look at every id a sequence has seen (prompt + generated).
Rebuilding that [rows, length] tensor from Python lists every step costs O(sequences x length) host
work and a copy of the same size; here each sequence owns a row of a persistent device buffer, its
prompt is written once and every step writes only the ids accepted since (one `index_put_` for the
whole batch). Rows of finished sequences are reused.
"""
from __future__ import annotations

import torch

from tgserve.core.sequence import Sequence, SequenceStatus


class TokenHistory:
    """Persistent int64 [rows, width] buffer of token ids; unused cells hold `pad_id` (= vocab size)."""

    def __init__(self, device: torch.device, pad_id: int, num_rows: int = 8, width: int = 256):
        self.device = device
        self.pad_id = pad_id
        self._ids = torch.full((num_rows, width), pad_id, dtype=torch.int64, device=device)
        self._row_of: dict[int, int] = {}  # request_id -> row
        self._seq_of_row: list[Sequence | None] = [None] * num_rows
        self._num_written: list[int] = [0] * num_rows  # leading accepted ids of the row's sequence written

    def rows(self, seqs: list[Sequence], num_ids: list[int]) -> torch.Tensor:
        """int64 [len(seqs), max(num_ids)]: row i holds the first `num_ids[i]` ids of `seqs[i]`, then
        `pad_id`. A sequence may repeat (one row per sampled position, its proposed tokens included
        up to `num_ids`); `num_ids[i]` = 0 gives an all-padding row (no penalty)."""
        width = max(num_ids)
        self._write([seq for seq, n in zip(seqs, num_ids) if n > 0], width)
        row_ids = torch.tensor([self._row_of[seq.request_id] if n > 0 else 0 for seq, n in zip(seqs, num_ids)],
                               dtype=torch.int64).to(self.device)
        lengths = torch.tensor(num_ids, dtype=torch.int64).to(self.device)
        ids = self._ids.index_select(0, row_ids)[:, :width]
        is_valid = torch.arange(width, device=self.device).unsqueeze(0) < lengths.unsqueeze(1)
        return torch.where(is_valid, ids, self.pad_id)

    def _write(self, seqs: list[Sequence], width: int) -> None:
        """Bring each sequence's row up to date: the ids it accepted since the last write, and its
        current proposed tokens (rewritten every step, as rejected ones are replaced)."""
        rows, columns, values = [], [], []
        for seq in dict.fromkeys(seqs):  # unique, in order
            row = self._row_of.get(seq.request_id)
            if row is None:
                row = self._claim_row(seq)
            start = self._num_written[row]
            rows.extend([row] * (len(seq.token_ids) - start))
            columns.extend(range(start, len(seq.token_ids)))
            values.extend(seq.token_ids[start:])
            self._num_written[row] = len(seq.token_ids) - seq.num_proposed_tokens
        self._grow(len(self._seq_of_row), max(width, max(columns, default=-1) + 1))
        if values:
            self._ids.index_put_((torch.tensor(rows).to(self.device), torch.tensor(columns).to(self.device)),
                                 torch.tensor(values, dtype=torch.int64).to(self.device))

    def _claim_row(self, seq: Sequence) -> int:
        """A free row for `seq`: one never used, one whose sequence finished, or a new one."""
        free = [row for row, owner in enumerate(self._seq_of_row)
                if owner is None or owner.status is SequenceStatus.FINISHED]
        if not free:
            free = [len(self._seq_of_row)]
            self._grow(2 * len(self._seq_of_row), self._ids.shape[1])
        row = free[0]
        owner = self._seq_of_row[row]
        if owner is not None:
            del self._row_of[owner.request_id]
        self._seq_of_row[row], self._num_written[row] = seq, 0
        self._row_of[seq.request_id] = row
        return row

    def _grow(self, num_rows: int, width: int) -> None:
        """Enlarge the buffer (doubling) to at least [num_rows, width], keeping what it holds."""
        old_rows, old_width = self._ids.shape
        if num_rows <= old_rows and width <= old_width:
            return
        new_width = max(width, 2 * old_width) if width > old_width else old_width
        ids = torch.full((num_rows, new_width), self.pad_id, dtype=torch.int64, device=self.device)
        ids[:old_rows, :old_width] = self._ids
        self._ids = ids
        self._seq_of_row += [None] * (num_rows - old_rows)
        self._num_written += [0] * (num_rows - old_rows)
