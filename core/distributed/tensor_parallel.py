"""One rank's tensor-parallel context: who it is, its process group, and the two collectives a model step needs.

A sharded model step needs exactly two kinds of communication: summing the partial outputs of a
row-parallel layer (o_proj, down_proj, and the vocabulary-parallel embedding), and bringing the
vocabulary-sharded logits together for sampling. Keeping both here, behind one small object the model
holds, is what lets the model run the same code at one rank (both calls return at once, with no
torch.distributed call, so an unsharded server never initializes torch.distributed) and at N.

The logits are gathered to rank 0 (`torch.distributed.gather`), not all-gathered: only rank 0 samples
(it runs the scheduler and sampling, ARCHITECTURE "Tensor parallelism"), so copying the [N, vocab]
float32 logits to every other rank would move (world - 1) times the bytes for nothing; at Qwen2's
152k vocabulary a 32-row decode step is 19 MiB of logits. The other ranks get None back.

Start-up adds one more, outside any step: `gather_text` brings each rank's line about its own shard
(which weights it dequantized at load) to rank 0, the one rank that logs at INFO.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tgserve.core.distributed.collective_clock import CollectiveClock

TEXT_BYTES = 4096  # the most of one rank's start-up line `gather_text` carries (UTF-8)


@dataclass(slots=True, frozen=True)
class TensorParallel:
    """This process's place among the ranks that share one model."""

    rank: int  # 0 .. world_size - 1; rank 0 samples and receives the full logits
    world_size: int  # ranks sharing the model (the server's --num-shard), 1 when unsharded
    group: object = None  # the torch.distributed ProcessGroup of those ranks; None at world_size 1
    # seconds inside this rank's collectives (these two and the step broadcast's), taken by the engine per step
    clock: CollectiveClock = field(default_factory=CollectiveClock, compare=False)

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size} ranks")
        if self.world_size > 1 and self.group is None:
            raise ValueError(f"{self.world_size} ranks need a torch.distributed process group")

    @classmethod
    def single(cls) -> "TensorParallel":
        """The unsharded context: rank 0 of 1, no process group."""
        return cls(0, 1, None)

    @classmethod
    def from_group(cls, group=None) -> "TensorParallel":
        """This process's context in `group` (default: the world torch.distributed was initialized with)."""
        group = group if group is not None else dist.group.WORLD
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    @property
    def is_sampling_rank(self) -> bool:
        """Whether this rank receives the full logits (rank 0)."""
        return self.rank == 0

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum a row-parallel layer's partial output [..., features] over the ranks, in place; returns it."""
        if self.world_size > 1:
            started_s = time.perf_counter()
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=self.group)
            self.clock.add(started_s)
        return partial

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor | None:
        """This rank's vocabulary slice of the logits [N, vocab / world] -> the full [N, vocab] on rank 0.

        Rank r holds vocabulary rows [r * vocab / world, (r + 1) * vocab / world) (a column-parallel
        lm_head), so the slices concatenate in rank order. Other ranks get None. Every rank must call it.
        """
        if self.world_size == 1:
            return local
        local = local.contiguous()
        slices = [torch.empty_like(local) for _ in range(self.world_size)] if self.is_sampling_rank else None
        started_s = time.perf_counter()
        dist.gather(local, gather_list=slices, dst=dist.get_global_rank(self.group, 0), group=self.group)
        self.clock.add(started_s)
        return torch.cat(slices, dim=-1) if self.is_sampling_rank else None

    def gather_text(self, text: str | None, device: torch.device) -> list[str | None] | None:
        """Every rank's `text` (None: nothing to say), in rank order, on rank 0; None on the others.

        Start-up only. The text travels as a fixed TEXT_BYTES buffer on the rank's `device` (longer
        texts are cut) through the same gather the logits take, so it needs nothing but tensors every
        communicator moves: an object collective would need NCCL's current device set. Every rank must call it.
        """
        if self.world_size == 1:
            return [text]
        encoded = (text or "").encode()[:TEXT_BYTES]
        local = torch.zeros(TEXT_BYTES, dtype=torch.uint8)
        local[:len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
        local = local.to(device)
        slices = [torch.empty_like(local) for _ in range(self.world_size)] if self.is_sampling_rank else None
        dist.gather(local, gather_list=slices, dst=dist.get_global_rank(self.group, 0), group=self.group)
        if not self.is_sampling_rank:
            return None
        texts = [bytes(piece.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for piece in slices]
        return [text or None for text in texts]
