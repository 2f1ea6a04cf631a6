"""Act-order layers (GPTQ's desc_act, compressed-tensors' actorder "group"): inputs whose quantization
groups are not runs of consecutive inputs, sorted into the runs the weight-only kernels read.

A checkpoint's g_idx gives each input its group: the row of the layer's scales and zero points it
reads. Sorting the inputs stably by group makes every group a run; the common affine form then keeps
that sort as `input_perm` and the runs' scale rows in run order. On a whole layer every run holds
group_size inputs (the last may hold fewer). A row-parallel rank holds a contiguous slice of the
inputs, and act-order scatters each group's inputs over the whole input range, so the slice holds a
part of many groups: runs of uneven length, which no grouped kernel reads. Such a slice keeps each
input's scale row (`AffineQuantizedWeight.input_groups`, with the layer's whole scales) and is
dequantized once at load (`weight_only.DequantizedKernel`): exactly the checkpoint's values, at the
run dtype's size rather than the codes'. TGI makes the same trade: its exllama kernel is refused for
act-order row-parallel layers and a kernel that reads g_idx per input serves them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True, frozen=True)
class GroupRuns:
    """How one layer's inputs (or one rank's slice of them) become runs of whole groups."""

    input_perm: torch.Tensor | None  # int64 [in]: the inputs sorted stably by group; None: already in order
    group_rows: torch.Tensor  # int64 [num_runs]: the scale / zero-point row each run reads, in run order


def group_runs(groups: torch.Tensor, group_size: int) -> GroupRuns | None:
    """groups: int64 [in], each input's row of the scales. The sort into runs of `group_size` inputs (the
    last run may be shorter), or None where the runs come out uneven (a row-parallel slice under act-order,
    or a g_idx that contradicts group_size: the caller tells them apart)."""
    perm = torch.argsort(groups, stable=True)
    rows, counts = torch.unique_consecutive(groups[perm], return_counts=True)
    if bool((counts[:-1] != group_size).any()) or int(counts[-1]) > group_size:
        return None
    is_sorted = torch.equal(perm, torch.arange(groups.shape[0], device=groups.device))
    return GroupRuns(None if is_sorted else perm, rows)
