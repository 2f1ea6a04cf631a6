"""The token embedding split over tensor-parallel ranks by vocabulary rows.

Vocabulary-parallel rather than replicated: the embedding is the largest single tensor of a small
model (Qwen2-7B: 152k x 3584, 1.1 GB in bf16; Qwen2-0.5B: 136M of its 494M parameters), and every
rank holding all of it would undo much of what sharding saves. The price is one all-reduce of the
step's [T, hidden] input per step, next to the two per layer: each rank embeds the ids in its
rows, writes zeros for the others, and the sum over ranks is the full embedding (exactly: one
rank contributes each row, the rest add zeros). At one rank the rows are the whole vocabulary and
`forward` is a plain embedding lookup.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgserve.core.distributed.tensor_parallel import TensorParallel


class VocabParallelEmbedding(nn.Module):
    """Token ids [T] -> embeddings [T, hidden], rank r holding rows [r * vocab / world, (r + 1) * vocab / world)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        if vocab_size % tp.world_size:
            raise ValueError(f"vocabulary of {vocab_size} does not split over {tp.world_size} ranks")
        self.num_local_rows = vocab_size // tp.world_size
        self.first_row = tp.rank * self.num_local_rows
        self.vocab_size, self.tp = vocab_size, tp
        self.weight = nn.Parameter(torch.empty(self.num_local_rows, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    def load(self, tensor: torch.Tensor) -> None:
        """Copy this rank's rows of the checkpoint's whole [vocab, hidden] embedding."""
        if tensor.shape[0] != self.vocab_size or tensor.shape[1:] != self.weight.shape[1:]:
            raise ValueError(f"embedding of shape {tuple(tensor.shape)} where [{self.vocab_size}, "
                             f"{self.weight.shape[1]}] was expected")
        self.weight.data.copy_(tensor.narrow(0, self.first_row, self.num_local_rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:  # the whole vocabulary: no mask ops on an unsharded server's every step
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.first_row
        is_elsewhere = (local_ids < 0) | (local_ids >= self.num_local_rows)  # [T]: another rank's row
        embedded = F.embedding(local_ids.masked_fill(is_elsewhere, 0), self.weight)
        embedded.masked_fill_(is_elsewhere.unsqueeze(-1), 0)
        return self.tp.all_reduce(embedded)
