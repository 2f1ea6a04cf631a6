"""Linear layers through oneDNN with weights packed once at load time.

`F.linear` on CPU re-lays out the weight for the GEMM kernel on every call; oneDNN can do that
once (`_reorder_linear_weight`) and then run the packed matmul (`_linear_pointwise`). Measured on
Zen5 (2 threads) at batch 1 with a [9728, 896] weight: bf16 0.14 ms vs 0.33-0.52 ms for
`F.linear`, fp32 0.57 ms vs 1.8 ms; still ahead at 64 and 512 rows. They are the private ops
torch.compile's CPU backend (inductor) emits for frozen weights, hence the probe below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tgserve.core.layers.linear import LinearMethod, linear_from_dense

# The packed layout is chosen for this many rows of x; decode (1 token per sequence) dominates
# serving time, and measured results stay correct (only a little less fast) at other batch sizes.
PACKED_BATCH_SIZE_HINT = 1


class OneDnnLinearMethod(LinearMethod):
    """Unquantized bf16 / fp32 linear: the reference's dense parameters, the weight [out, in] packed
    for oneDNN once loaded (the dense copy is then freed), the bias kept as is."""

    name = "onednn"

    def prepare(self, params: dict[str, torch.Tensor]) -> object:
        weight = params["weight"]
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACKED_BATCH_SIZE_HINT)
        return packed, params.get("bias"), weight.shape[0]

    def apply(self, prepared: object, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]; oneDNN wants exactly 2-D [rows, in]."""
        packed, bias, out_features = prepared
        rows = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], out_features)


def make_onednn_linear_method(dtype: torch.dtype) -> OneDnnLinearMethod | None:
    """An `OneDnnLinearMethod` for `dtype` if this torch build runs it correctly here, else None.

    fp16 is left to the reference method: oneDNN's fp16 path needs AVX512-FP16/AMX-FP16, which few
    CPUs have. A small probe catches builds where the private ops are missing or wrong for this
    dtype (e.g. bf16 on a CPU without AVX512).
    """
    if dtype not in (torch.bfloat16, torch.float32) or not torch.backends.mkldnn.is_available():
        return None
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return None
    method = OneDnnLinearMethod()
    try:
        return method if _matches_reference(method, dtype) else None
    except RuntimeError:  # op present but not implemented for this dtype / CPU
        return None


def _matches_reference(method: LinearMethod, dtype: torch.dtype) -> bool:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 32, generator=generator).to(dtype)
    bias = torch.randn(48, generator=generator).to(dtype)
    x = torch.randn(3, 5, 32, generator=generator).to(dtype)
    with torch.no_grad():
        y = linear_from_dense(method, weight, bias)(x)
        reference = F.linear(x.float(), weight.float(), bias.float())
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return y.shape == reference.shape and torch.allclose(y.float(), reference, rtol=tolerance, atol=tolerance * 10)
