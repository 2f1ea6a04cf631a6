"""Linear layers whose parameters, loading format and matmul come from a pluggable `LinearMethod`.

The method is what quantization and device backends swap: it allocates and names the layer's
parameters (`weight`, `bias`; a quantized method `qweight`, `scales`, ...), turns them into what its
matmul reads once they are loaded, and runs the matmul. The core's reference keeps a dense [out, in]
weight for `F.linear`; the cpu backend packs it for oneDNN. Each parameter says which of its dims
index output and input features, so `Linear` loads any method's checkpoint tensors, and slices them
for tensor parallelism, without branching on the method's class. The model never knows the format.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn


class LinearLoadError(ValueError):
    """A checkpoint tensor this layer has no parameter for or whose slice does not fit, or a layer
    whose fused parts (or packed elements) do not divide over its tensor-parallel ranks."""


class Parallel(enum.Enum):
    """How a layer splits across tensor-parallel ranks (Megatron's column / row parallelism)."""

    REPLICATED = "replicated"  # every rank holds the whole layer
    COLUMN = "column"  # each rank holds 1/world of every fused part's output features; outputs concatenate
    ROW = "row"  # each rank holds 1/world of the input features; partial outputs sum (all-reduce)


@dataclass(slots=True)
class LinearParam:
    """One tensor a `LinearMethod` allocated, and how checkpoint tensors map onto its dims."""

    data: torch.Tensor  # this rank's tensor, filled by `Linear.load`
    output_dim: int | None  # dim indexed by output features; None: the same for every part and rank
    input_dim: int | None = None  # dim indexed by input features; None: whole on every row-parallel rank
    # Features per element along output_dim / input_dim (8: eight int4 in an int32; a group's size for
    # scales). A Fraction where an element holds a non-whole number of them: 3-bit GPTQ packs 32 values
    # into 3 int32 words, Fraction(32, 3); slices then start and end on whole 3-word runs.
    output_pack: int | Fraction = 1
    input_pack: int | Fraction = 1
    # True: each fused part has its own copy of this tensor (GPTQ's g_idx), stored along a leading
    # [num_parts] axis of `data`; part p's checkpoint tensor fills data[p] (output_dim must be None, and
    # input_dim counts the checkpoint tensor's dims).
    is_per_part: bool = False
    # True: indexed by input features along input_dim (input_pack per element), yet every row-parallel
    # rank holds all of them: `Linear` allocates it for the layer's whole input and loads it unsliced.
    # Act-order scales and zero points (GPTQ, compressed-tensors): a rank's slice of the inputs reads
    # rows of every group.
    is_input_whole: bool = False
    # None: each checkpoint tensor is this parameter's slice as is. An int b: this parameter holds a
    # float scale per output feature ([out, cols], output_dim 0) that each fused part's checkpoint
    # tensor stores coarser, expanded at load: one element (per-tensor, as fp8's q/k/v each carry
    # their own) fills the part's rows; [n] or [n, 1] is per row; [ceil(n / b), cols] holds one row
    # per block of b output features, the last block ragged (fp8's block-wise `weight_scale_inv`).
    row_block: int | None = None
    # True: a per-part tensor (is_per_part) whose part p holds that part's whole [output features, input
    # features] as the checkpoint states them (compressed-tensors' weight_shape). `Linear.load` checks
    # the values against the layer before any slicing, so no method compares them with a rank's slice.
    is_part_shape: bool = False
    # True: not a checkpoint tensor. `Linear` fills it, int64 [in] with input_dim 0, with the positions of
    # this rank's input features in the whole layer (0 .. in - 1 unsharded, a row-parallel rank's
    # contiguous slice otherwise), so a method whose per-group tensors are whole (is_input_whole) finds
    # the groups its inputs read without knowing how the layer splits.
    is_input_positions: bool = False


class LinearMethod:
    """Reference unquantized method: a dense [out, in] weight (and [out] bias) and `F.linear`.

    A method is stateless and shared by every layer; the three calls below are its whole contract.
    A bias, where a layer has one, is the parameter named "bias" (checkpoints name it so).
    """

    name = "unquantized"

    def create_params(self, in_features: int, output_sizes: list[int], has_bias: bool,
                      dtype: torch.dtype, device: torch.device) -> dict[str, LinearParam]:
        """Allocate one rank's parameters: `in_features` inputs, fused parts of `output_sizes` outputs.

        Called once per layer when the model is built. Names are the checkpoint's tensor suffixes.
        """
        out_features = sum(output_sizes)
        params = {"weight": LinearParam(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                        output_dim=0, input_dim=1)}
        if has_bias:
            params["bias"] = LinearParam(torch.zeros(out_features, dtype=dtype, device=device), output_dim=0)
        return params

    def method_for(self, prefixes: tuple[str, ...]) -> "LinearMethod":
        """The method for the layer fused from checkpoint modules `prefixes` ("model.layers.0.mlp.up_proj");
        a quantized format answers its dense fallback for layers the checkpoint keeps in float."""
        return self

    def prepare(self, params: dict[str, torch.Tensor]) -> object:
        """Turn the loaded tensors (by name) into what `apply` reads. Called once per layer after loading."""
        return params["weight"], params.get("bias")

    def apply(self, prepared: object, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]. Called per layer per step."""
        weight, bias = prepared
        return F.linear(x, weight, bias)

    def describe(self) -> str:
        """The format in words, for load errors ("unquantized", "gptq 4-bit, group size 128")."""
        return self.name

    def describe_loaded(self) -> str | None:
        """One line for the start-up log once the model is loaded (which weights went to which kernel),
        or None for nothing to say. Called once per process, on the model-wide method."""
        return None


class Linear(nn.Module):
    """y = x W^T + b, W in the method's format, loaded from one or several fused checkpoint tensors.

    `output_sizes` lists the output features of each checkpoint tensor fused into this layer (q, k, v
    become one qkv layer); `load(part, name, tensor)` fills part `part` of parameter `name`. With
    `world_size` > 1 the layer holds rank `rank`'s slice: COLUMN takes 1/world of every part's
    outputs, ROW 1/world of the inputs. A ROW layer's bias lives on rank 0 only, so summing the
    ranks' partial outputs (issue 14's all-reduce) adds it exactly once. `prefixes` names the
    checkpoint modules fused here, one per part, so a quantized method can keep float layers float.

    `part_shards` (COLUMN only) says into how many distinct slices each part is cut, default
    `world_size` for every part. Fewer slices than ranks replicate a part: rank r holds slice
    r * shards // world_size, so consecutive ranks share one (the KV heads of a model with fewer KV
    heads than ranks, issue 14). It is a count of slices, not a format property, so it works the same
    through every method's packed axes.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, method: LinearMethod,
                 dtype: torch.dtype, device: torch.device, parallel: Parallel = Parallel.REPLICATED,
                 rank: int = 0, world_size: int = 1, prefixes: tuple[str, ...] = (),
                 part_shards: list[int] | None = None):
        super().__init__()
        if prefixes and len(prefixes) != len(output_sizes):
            raise LinearLoadError(f"{len(prefixes)} checkpoint names {prefixes} for {len(output_sizes)} fused parts")
        method = method.method_for(prefixes)
        self.part_shards = _part_shards(parallel, world_size, len(output_sizes), part_shards)
        if (any(size % shards for size, shards in zip(output_sizes, self.part_shards))
                or (parallel is Parallel.ROW and in_features % world_size)):
            raise LinearLoadError(f"{parallel.value}-parallel layer [{in_features} -> {output_sizes}] does not "
                                  f"split over {world_size} ranks (slices per part: {self.part_shards})")
        self.output_sizes = output_sizes
        self.prefixes = prefixes
        self.parallel, self.rank, self.world_size = parallel, rank, world_size
        self.local_output_sizes = [size // shards for size, shards in zip(output_sizes, self.part_shards)]
        self.in_features = in_features  # the whole layer's
        self.local_in_features = in_features // world_size if parallel is Parallel.ROW else in_features
        self.method = method
        self.is_bias_elsewhere = bias and parallel is Parallel.ROW and rank != 0
        self.params: dict[str, LinearParam] | None = method.create_params(
            self.local_in_features, self.local_output_sizes, bias and not self.is_bias_elsewhere, dtype, device)
        for name, param in self.params.items():
            if param.is_input_whole and self.is_input_sliced:
                shape = list(param.data.shape)
                shape[param.input_dim] = -(-in_features // param.input_pack)  # whole on every rank
                param.data = param.data.new_empty(shape)
            if param.is_input_positions:
                first = self.rank * self.local_in_features if self.is_input_sliced else 0
                param.data.copy_(torch.arange(first, first + self.local_in_features))
            _check_packing(name, param, self.local_output_sizes, self.local_in_features, self.is_sliced(param))
        self.prepared: object = None

    @property
    def is_input_sliced(self) -> bool:
        """Whether this rank holds a slice of the input features (row parallel over several ranks)."""
        return self.parallel is Parallel.ROW and self.world_size > 1

    def is_sliced(self, param: LinearParam) -> bool:
        """Whether this rank holds a slice of `param` along its input dim."""
        return param.input_dim is not None and self.is_input_sliced and not param.is_input_whole

    def load(self, part: int, name: str, tensor: torch.Tensor) -> None:
        """Copy this rank's slice of checkpoint tensor `name` ("weight", "qweight", ...) into fused part `part`.

        Raises LinearLoadError naming the checkpoint tensor ("model.layers.0.self_attn.q_proj.qweight")
        when its shape is not the one the method allocated for (a format's bits or group size contradicted),
        or it holds integers where floats are expected or the reverse, or it records a module shape
        (`is_part_shape`) other than the layer's.
        """
        if name == "bias" and self.is_bias_elsewhere:
            return
        param = self.params.get(name)
        if param is None or param.is_input_positions:
            raise LinearLoadError(f"checkpoint has {name} but this layer ({self.method.name}) has no such parameter")
        target, source = (param.data[part] if param.is_per_part else param.data), tensor
        if param.row_block is not None:
            source = _rows_per_output(name, part, tensor, self.output_sizes[part], param.row_block)
        expected = self._checkpoint_shape(param, part, target)
        full_name = f"{self.prefixes[part]}.{name}" if self.prefixes else name
        if tuple(source.shape) != expected:  # narrow would fail, or copy_ broadcast a wrong shape silently
            raise LinearLoadError(f"checkpoint tensor {full_name} has shape {tuple(source.shape)} but "
                                  f"{self.method.describe()} expects {expected}: it does not fit")
        if source.dtype.is_floating_point != target.dtype.is_floating_point:  # copy_ would convert silently
            raise LinearLoadError(f"checkpoint tensor {full_name} is {source.dtype} but {self.method.describe()} "
                                  f"expects {'a float' if target.dtype.is_floating_point else 'an integer'} dtype")
        if param.is_part_shape and source.tolist() != [self.output_sizes[part], self.in_features]:
            raise LinearLoadError(f"checkpoint tensor {full_name} says the module is {source.tolist()} [out, in], "
                                  f"but the model's layer is [{self.output_sizes[part]}, {self.in_features}]")
        if param.output_dim is not None:
            size = self.local_output_sizes[part]
            start = self.rank * self.part_shards[part] // self.world_size * size  # this rank's slice of the part
            target = target.narrow(param.output_dim, sum(self.local_output_sizes[:part]) // param.output_pack,
                                   size // param.output_pack)
            source = source.narrow(param.output_dim, start // param.output_pack, size // param.output_pack)
        if self.is_sliced(param):
            size = self.local_in_features
            source = source.narrow(param.input_dim, self.rank * size // param.input_pack, size // param.input_pack)
        target.copy_(source)

    def _checkpoint_shape(self, param: LinearParam, part: int, target: torch.Tensor) -> tuple[int, ...]:
        """The whole checkpoint tensor's shape for fused part `part`, from this rank's `target`."""
        shape = list(target.shape)
        if param.output_dim is not None:
            shape[param.output_dim] = self.output_sizes[part] // param.output_pack
        if self.is_sliced(param):
            shape[param.input_dim] *= self.world_size
        return tuple(shape)

    def finalize(self) -> None:
        """Hand the loaded tensors to the method (packing, quantizing); called once after loading."""
        self.prepared = self.method.prepare({name: param.data for name, param in self.params.items()})
        self.params = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self.prepared, x)


def _part_shards(parallel: Parallel, world_size: int, num_parts: int, part_shards: list[int] | None) -> list[int]:
    """Distinct output slices of each fused part: `world_size` for COLUMN unless given, 1 otherwise.
    A given count must divide the ranks evenly, so each slice is shared by the same number of them."""
    if part_shards is None:
        return [world_size if parallel is Parallel.COLUMN else 1] * num_parts
    if parallel is not Parallel.COLUMN or len(part_shards) != num_parts:
        raise LinearLoadError(f"slices per part {part_shards} need a column-parallel layer of {num_parts} parts")
    if any(shards < 1 or world_size % shards for shards in part_shards):
        raise LinearLoadError(f"slices per part {part_shards} do not divide {world_size} ranks evenly")
    return list(part_shards)


def _check_packing(name: str, param: LinearParam, local_output_sizes: list[int], local_in_features: int,
                   is_input_sliced: bool) -> None:
    """Every part's (and a sliced input's) features must fill whole packed elements, or slices would tear
    them. An unsliced input may end in a partial element (a last, shorter quantization group)."""
    if param.is_per_part and param.output_dim is not None:
        raise LinearLoadError(f"{name}: a per-part tensor cannot also be indexed by output features")
    if param.output_dim is not None and any(size % param.output_pack for size in local_output_sizes):
        raise LinearLoadError(f"{name}: output parts {local_output_sizes} not multiples of {param.output_pack}")
    if param.input_dim is not None and is_input_sliced and local_in_features % param.input_pack:
        raise LinearLoadError(f"{name}: a row-parallel rank's {local_in_features} input features are not a multiple "
                              f"of {param.input_pack} (the format's packing or quantization group), so the split "
                              f"would cut one; choose a `--num-shard` that keeps them whole")


def _rows_per_output(name: str, part: int, tensor: torch.Tensor, num_rows: int, row_block: int) -> torch.Tensor:
    """A part's coarse scale tensor (see `LinearParam.row_block`) as [num_rows, cols], one row per output."""
    if tensor.numel() == 1:
        return tensor.reshape(1, 1).expand(num_rows, 1)
    rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() else tensor.reshape(1, 1)
    num_blocks = -(-num_rows // row_block)
    if rows.shape[0] != num_blocks:
        raise LinearLoadError(f"checkpoint {name} part {part}: {tuple(tensor.shape)} has {rows.shape[0]} rows where "
                              f"{num_rows} outputs in blocks of {row_block} need {num_blocks}")
    return rows.repeat_interleave(row_block, dim=0)[:num_rows]


def linear_from_dense(method: LinearMethod, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
    """A replicated, finalized `Linear` computing `F.linear(x, weight, bias)` through `method` (probes, tests)."""
    layer = Linear(weight.shape[1], [weight.shape[0]], bias is not None, method, weight.dtype, weight.device)
    layer.load(0, "weight", weight)
    if bias is not None:
        layer.load(0, "bias", bias)
    layer.finalize()
    return layer
