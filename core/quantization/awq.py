"""AWQ checkpoints in AutoAWQ's GEMM layout (AutoAWQ, transformers' AwqConfig, `quant_method: awq`).

Per quantized module `m` of W [out, in], 4 bits, G = in / group_size groups (group_size -1: one group):

    m.qweight  int32 [in, out / 8]   codes along the outputs, eight per word
    m.qzeros   int32 [G, out / 8]    zero points, packed like qweight
    m.scales   float16 [G, out]

Unlike GPTQ, the eight 4-bit values of a word are interleaved: nibble j (bits [4j, 4j + 4)) holds
output column 8c + AWQ_ORDER[j] of word c, so columns 0..7 sit at nibbles 0, 4, 1, 5, 2, 6, 3, 7.
W[o, i] = (q[i, o] - zero[i // group_size, o]) * scale[i // group_size, o]. With `zero_point: false`
the codes are stored offset by 8 and a checkpoint may omit qzeros (the zero point is then 8).
lm_head and `modules_to_not_convert` stay float. Only the GEMM packing is read; AutoAWQ's GEMV
(packs along the inputs) and ExLlama / Marlin versions are refused by name.
"""
from __future__ import annotations

import torch

from tgserve.core.layers.linear import LinearMethod, LinearParam
from tgserve.core.quantization.method import QuantizedLinearMethod
from tgserve.core.quantization.quant_config import QuantizationConfig, QuantizationError
from tgserve.core.quantization.weight_only import AffineQuantizedWeight, WeightOnlyKernel

AWQ_BITS = 4
AWQ_PACK = 32 // AWQ_BITS  # codes per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of a word holds output column AWQ_ORDER[j] of its eight
# Every nibble 8: the zero point of codes stored offset by 8 (zero_point false), as an int32 word.
_SYMMETRIC_ZEROS_WORD = int.from_bytes(b"\x88" * 4, "little", signed=True)


class AwqLinearMethod(QuantizedLinearMethod):
    """Loads a layer's qweight / qzeros / scales and converts them to the common affine form."""

    name = "awq"

    def __init__(self, quantization: QuantizationConfig, dtype: torch.dtype, dense: LinearMethod,
                 kernels: tuple[WeightOnlyKernel, ...] = ()):
        super().__init__(quantization, dtype, dense, kernels)
        section = quantization.checkpoint_config
        version = str(section.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantizationError(f"awq: version {section.get('version')!r} in the checkpoint's "
                                    f"quantization_config; tgserve loads only AutoAWQ's GEMM packing (\"gemm\")")
        if quantization.bits != AWQ_BITS:
            raise QuantizationError(f"awq: bits {quantization.bits} in the checkpoint's quantization_config; "
                                    f"tgserve loads {AWQ_BITS}-bit AWQ")
        if quantization.group_size is None or not (quantization.group_size == -1 or quantization.group_size > 0):
            raise QuantizationError(f"awq: group_size {quantization.group_size} in the checkpoint's "
                                    f"quantization_config; expected -1 or a positive size")
        self.is_zero_point = bool(section.get("zero_point", True))

    def _group(self, in_features: int) -> int:
        group = in_features if self.quantization.group_size == -1 else self.quantization.group_size
        if in_features % group:
            raise QuantizationError(f"awq: group_size {group} does not divide a layer's {in_features} input "
                                    f"features")
        return group

    def create_params(self, in_features: int, output_sizes: list[int], has_bias: bool,
                      dtype: torch.dtype, device: torch.device) -> dict[str, LinearParam]:
        out_features, group = sum(output_sizes), self._group(in_features)
        num_groups = in_features // group
        zeros = torch.full((num_groups, out_features // AWQ_PACK), _SYMMETRIC_ZEROS_WORD, dtype=torch.int32,
                           device=device)  # kept where a zero_point-false checkpoint has no qzeros
        params = {
            "qweight": LinearParam(torch.empty(in_features, out_features // AWQ_PACK, dtype=torch.int32,
                                               device=device), output_dim=1, input_dim=0, output_pack=AWQ_PACK),
            "qzeros": LinearParam(zeros, output_dim=1, input_dim=0, output_pack=AWQ_PACK, input_pack=group),
            # float32 holds the checkpoint's float16 (or bfloat16) scales exactly
            "scales": LinearParam(torch.empty(num_groups, out_features, dtype=torch.float32, device=device),
                                  output_dim=1, input_dim=0, input_pack=group),
        }
        if has_bias:
            params["bias"] = LinearParam(torch.zeros(out_features, dtype=dtype, device=device), output_dim=0)
        return params

    def to_affine(self, params: dict[str, torch.Tensor]) -> AffineQuantizedWeight:
        q = unpack_awq_words(params["qweight"]).t().contiguous()  # [out, in]
        zeros = unpack_awq_words(params["qzeros"]).t().float()  # [out, G]
        return AffineQuantizedWeight(q=q, scales=params["scales"].t().contiguous(), zeros=zeros.contiguous(),
                                     bits=AWQ_BITS, group_size=q.shape[1] // zeros.shape[1], input_perm=None,
                                     bias=params.get("bias"))


def unpack_awq_words(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8] in AWQ's interleaved nibble order -> uint8 [rows, cols] in column order."""
    shifts = torch.arange(0, 32, AWQ_BITS, dtype=torch.int32, device=packed.device)
    nibbles = (packed[..., None] >> shifts) & 0xF  # [rows, words, 8]: nibble j of each word
    columns = torch.empty_like(nibbles)
    columns[..., list(AWQ_ORDER)] = nibbles  # nibble j is column AWQ_ORDER[j] of its word
    return columns.reshape(packed.shape[0], -1).to(torch.uint8)
