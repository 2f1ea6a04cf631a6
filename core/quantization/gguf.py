"""GGUF models' linear weights: llama.cpp's Q8_0 / Q4_0 / Q4_1 blocks kept as integers in the common affine form.

Each row of such a tensor is blocks of 32 inputs (llama.cpp's `ggml-common.h`), little-endian:
    Q8_0: d f16, qs int8[32]             W = d * qs
    Q4_0: d f16, qs u8[16]               W = d * (q - 8)
    Q4_1: d f16, m f16, qs u8[16]        W = d * q + m
where byte j of qs holds input j in its low nibble and input j + 16 in its high one. In affine form
(W = (q - zeros) * scales, group 32): Q8_0 codes qs + 128 with zeros 128, Q4_0 zeros 8, Q4_1 zeros
-m / d, so the backend's int8 / int4 weight-only kernels run them. The checkpoint reader
(`core/gguf_source.py`) hands a layer of these types its raw blocks as "blocks"; every other type
(K-quants, IQ, F16 ...) arrives dequantized as "weight" and runs on the backend's dense method, as
does a fused layer (q/k/v, gate/up) whose parts differ in type: `is_kept_quantized` decides both sides.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from tgserve.core.layers.linear import LinearMethod, LinearParam
from tgserve.core.quantization.method import QuantizedLinearMethod
from tgserve.core.quantization.quant_config import QuantizationConfig
from tgserve.core.quantization.weight_only import AffineQuantizedWeight, WeightOnlyKernel, prepare_with

BLOCK_INPUTS = 32  # inputs per block of every type below: the affine group size
# GGUF type name -> (bits, bytes per block)
AFFINE_TYPES = {"Q8_0": (8, 34), "Q4_0": (4, 18), "Q4_1": (4, 20)}


def is_kept_quantized(tensor_types: Iterable[str]) -> bool:
    """Whether a layer fused from tensors of these GGUF types loads as blocks: one type, and affine."""
    kinds = set(tensor_types)
    return len(kinds) == 1 and kinds <= AFFINE_TYPES.keys()


def blocks_to_affine(blocks: torch.Tensor, tensor_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks uint8 [out, in / 32, bytes per block] of `tensor_type` -> (q uint8 [out, in], scales float32
    [out, in / 32], zeros float32 [out, in / 32]) with W = (q - zeros) * scales."""
    out_features, num_blocks, _ = blocks.shape
    d = _f16(blocks, 0)
    if tensor_type == "Q8_0":
        codes = blocks[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128
        return codes.to(torch.uint8).reshape(out_features, -1), d, torch.full_like(d, 128.0)
    packed = blocks[..., 2:] if tensor_type == "Q4_0" else blocks[..., 4:]
    q = torch.cat([packed & 0x0F, packed >> 4], dim=-1)  # [out, blocks, 32]: inputs 0-15 low, 16-31 high
    if tensor_type == "Q4_0":
        return q.reshape(out_features, -1), d, torch.full_like(d, 8.0)
    if tensor_type != "Q4_1":
        raise ValueError(f"{tensor_type} is not one of the affine GGUF types {sorted(AFFINE_TYPES)}")
    m = _f16(blocks, 2)
    # W = d q + m = (q + m / d) d. A block with d == 0 is the constant m: codes 0, scale 1, zero -m.
    is_flat = d == 0
    q = torch.where(is_flat[..., None], torch.zeros_like(q), q)
    scales = torch.where(is_flat, torch.ones_like(d), d)
    zeros = -m / scales
    return q.reshape(out_features, -1), scales, zeros


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 at byte `offset` of every block, as float32 [out, blocks]."""
    return blocks[..., offset:offset + 2].contiguous().view(torch.float16).squeeze(-1).float()


class GgufLinearMethod(QuantizedLinearMethod):
    """The model's method for a GGUF file: per layer, a copy of itself typed Q8_0 / Q4_0 / Q4_1 where
    the layer's tensors are, the backend's dense method elsewhere. Counts where each tensor type went."""

    name = "gguf"

    def __init__(self, quantization: QuantizationConfig, dtype: torch.dtype, dense: LinearMethod,
                 kernels: tuple[WeightOnlyKernel, ...] = (), tensor_type: str | None = None, num_parts: int = 0,
                 placements: Counter | None = None):
        super().__init__(quantization, dtype, dense, kernels)
        self.tensor_type = tensor_type  # a layer's copy: its GGUF type; None on the model-wide instance
        self.num_parts = num_parts  # a layer's copy: the GGUF tensors fused into the layer
        # (GGUF type, where its tensors went) -> number of tensors; shared with the layers' copies
        self.placements = Counter() if placements is None else placements

    def method_for(self, prefixes: tuple[str, ...]) -> LinearMethod:
        tensor_types = self.quantization.checkpoint_config["tensor_types"]
        types = [tensor_types[prefix] for prefix in prefixes]
        if not is_kept_quantized(types):
            self.placements.update((kind, f"linear, dequantized to {_dtype_name(self.dtype)}") for kind in types)
            return self.dense
        return GgufLinearMethod(self.quantization, self.dtype, self.dense, self.kernels, types[0], len(types),
                                self.placements)

    def create_params(self, in_features: int, output_sizes: list[int], has_bias: bool,
                      dtype: torch.dtype, device: torch.device) -> dict[str, LinearParam]:
        assert self.tensor_type is not None, "create_params on the model-wide GGUF method, not a layer's copy"
        if in_features % BLOCK_INPUTS:
            raise ValueError(f"{self.tensor_type} layer with {in_features} inputs, not whole blocks of {BLOCK_INPUTS}")
        block_bytes = AFFINE_TYPES[self.tensor_type][1]
        blocks = torch.empty(sum(output_sizes), in_features // BLOCK_INPUTS, block_bytes, dtype=torch.uint8,
                             device=device)
        params = {"blocks": LinearParam(blocks, output_dim=0, input_dim=1, input_pack=BLOCK_INPUTS)}
        if has_bias:
            params["bias"] = LinearParam(torch.zeros(sum(output_sizes), dtype=dtype, device=device), output_dim=0)
        return params

    def to_affine(self, params: dict[str, torch.Tensor]) -> AffineQuantizedWeight:
        q, scales, zeros = blocks_to_affine(params["blocks"], self.tensor_type)
        return AffineQuantizedWeight(q=q, scales=scales, zeros=zeros, bits=AFFINE_TYPES[self.tensor_type][0],
                                     group_size=BLOCK_INPUTS, input_perm=None, bias=params.get("bias"))

    def prepare(self, params: dict[str, torch.Tensor]) -> object:
        weight = self.to_affine(params)
        kernel, prepared = prepare_with(self.kernels, weight, self.dtype)
        self.placements[(self.tensor_type, f"linear, int{weight.bits} {kernel.name} kernel")] += self.num_parts
        return kernel, prepared

    def describe_loaded(self) -> str | None:
        """"GGUF tensors: Q4_1 x210 linear, int4 reference kernel; Q8_0 x1 embedding, dequantized to float32; ..."."""
        counts = Counter(self.placements)
        for name, kind in self.quantization.checkpoint_config["tensor_types"].items():
            if name.endswith("embed_tokens"):
                counts[(kind, f"embedding, dequantized to {_dtype_name(self.dtype)}")] += 1
        parts = [f"{kind} x{count} {where}" for (kind, where), count in sorted(counts.items())]
        return "GGUF tensors: " + "; ".join(parts)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
