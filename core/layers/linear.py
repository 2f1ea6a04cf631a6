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
    output_pack: int = 1  # output features per element along output_dim (8: eight int4 in an int32)
    input_pack: int = 1  # input features per element along input_dim (2: two int4 per byte; a group's size)


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
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, method: LinearMethod,
                 dtype: torch.dtype, device: torch.device, parallel: Parallel = Parallel.REPLICATED,
                 rank: int = 0, world_size: int = 1, prefixes: tuple[str, ...] = ()):
        super().__init__()
        method = method.method_for(prefixes)
        split = world_size if parallel is Parallel.COLUMN else 1
        if any(size % split for size in output_sizes) or (parallel is Parallel.ROW and in_features % world_size):
            raise LinearLoadError(f"{parallel.value}-parallel layer [{in_features} -> {output_sizes}] does not "
                                  f"split over {world_size} ranks")
        self.output_sizes = output_sizes
        self.parallel, self.rank, self.world_size = parallel, rank, world_size
        self.local_output_sizes = [size // split for size in output_sizes]
        self.local_in_features = in_features // world_size if parallel is Parallel.ROW else in_features
        self.method = method
        self.is_bias_elsewhere = bias and parallel is Parallel.ROW and rank != 0
        self.params: dict[str, LinearParam] | None = method.create_params(
            self.local_in_features, self.local_output_sizes, bias and not self.is_bias_elsewhere, dtype, device)
        for name, param in self.params.items():
            _check_packing(name, param, self.local_output_sizes, self.local_in_features)
        self.prepared: object = None

    def load(self, part: int, name: str, tensor: torch.Tensor) -> None:
        """Copy this rank's slice of checkpoint tensor `name` ("weight", "qweight", ...) into fused part `part`."""
        if name == "bias" and self.is_bias_elsewhere:
            return
        param = self.params.get(name)
        if param is None:
            raise LinearLoadError(f"checkpoint has {name} but this layer ({self.method.name}) has no such parameter")
        target, source = param.data, tensor
        if param.output_dim is not None:
            size = self.local_output_sizes[part]
            start = self.rank * size if self.parallel is Parallel.COLUMN else 0
            target = target.narrow(param.output_dim, sum(self.local_output_sizes[:part]) // param.output_pack,
                                   size // param.output_pack)
            source = source.narrow(param.output_dim, start // param.output_pack, size // param.output_pack)
        if param.input_dim is not None and self.parallel is Parallel.ROW:
            size = self.local_in_features
            source = source.narrow(param.input_dim, self.rank * size // param.input_pack, size // param.input_pack)
        if source.shape != target.shape:  # copy_ would broadcast a wrong shape silently
            raise LinearLoadError(f"checkpoint {name} part {part}: slice {tuple(source.shape)} does not fit "
                                  f"{tuple(target.shape)}")
        target.copy_(source)

    def finalize(self) -> None:
        """Hand the loaded tensors to the method (packing, quantizing); called once after loading."""
        self.prepared = self.method.prepare({name: param.data for name, param in self.params.items()})
        self.params = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self.prepared, x)


def _check_packing(name: str, param: LinearParam, local_output_sizes: list[int], local_in_features: int) -> None:
    """Every part's (and the input's) features must fill whole packed elements, or slices would tear them."""
    if param.output_dim is not None and any(size % param.output_pack for size in local_output_sizes):
        raise LinearLoadError(f"{name}: output parts {local_output_sizes} not multiples of {param.output_pack}")
    if param.input_dim is not None and local_in_features % param.input_pack:
        raise LinearLoadError(f"{name}: {local_in_features} input features not a multiple of {param.input_pack}")


def linear_from_dense(method: LinearMethod, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
    """A replicated, finalized `Linear` computing `F.linear(x, weight, bias)` through `method` (probes, tests)."""
    layer = Linear(weight.shape[1], [weight.shape[0]], bias is not None, method, weight.dtype, weight.device)
    layer.load(0, "weight", weight)
    if bias is not None:
        layer.load(0, "bias", bias)
    layer.finalize()
    return layer
