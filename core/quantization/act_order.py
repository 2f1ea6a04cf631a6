"""Quantization groups on a layer's inputs, or on one rank's slice of them: sorted into the runs of whole
groups the weight-only kernels read, where they form such runs.

A layer's groups give each input the row of the scales and zero points it reads: input // group_size,
or a checkpoint's g_idx under act-order (GPTQ's desc_act, compressed-tensors' actorder "group"), which
scatters each group's inputs over the layer. Sorting the inputs stably by group makes every group a
run; the common affine form then keeps that sort as `input_perm` and the runs' scale rows in run order.
On a whole layer every run holds group_size inputs (the last may hold fewer).

A row-parallel rank holds a contiguous slice of the inputs and every group's scales (the formats mark
them `is_input_whole`). Its inputs still form whole runs where the split falls on group boundaries in
group order (groups of 16 over 176 inputs per rank); they do not where the split cuts a group (groups
of 32: rank 1's slice starts half-way into group 5) or under act-order (the slice holds a part of
many groups). Such a slice keeps each input's scale row (`AffineQuantizedWeight.input_groups`) and is
dequantized once at load (`weight_only.DequantizedKernel`): exactly the checkpoint's values, at the
run dtype's size rather than the codes'; the start-up log names those layers (`method`). TGI makes the
same trade for act-order: its exllama kernel is refused for act-order row-parallel layers and a kernel
that reads g_idx per input serves them.
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
    last run may be shorter), or None where the runs come out uneven (a row-parallel slice that cuts
    groups or holds act-order's scattered ones, or a g_idx that contradicts group_size: the caller tells
    them apart)."""
    perm = torch.argsort(groups, stable=True)
    rows, counts = torch.unique_consecutive(groups[perm], return_counts=True)
    if bool((counts[:-1] != group_size).any()) or int(counts[-1]) > group_size:
        return None
    is_sorted = torch.equal(perm, torch.arange(groups.shape[0], device=groups.device))
    return GroupRuns(None if is_sorted else perm, rows)
