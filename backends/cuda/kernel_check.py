"""The start-up check a GPU backend's weight-only kernels pass before they are offered.

Each kernel multiplies a small random weight (asymmetric zeros, an input permutation, a bias, N and K
off every block size) at a decode and a prefill-sized row count, on the run's device and dtype, and
must answer what the core's reference kernel answers. A Triton, driver or GPU that cannot build or
run a kernel (a compile error, too little shared memory) then costs speed, never the server: the
layers run the reference kernel and one line per refused kernel says why. Once per process, at the
linear-method hook; the first call also compiles the kernels for these shapes.
"""
from __future__ import annotations

import logging

import torch

from tgserve.core.quantization.weight_only import AffineQuantizedWeight, ReferenceKernel, WeightOnlyKernel

log = logging.getLogger(__name__)

CHECK_ROWS = (1, 80)  # a decode call (K split over programs) and a prefill-sized one (M tiled, masked)
TOLERANCE = 2e-2  # of the output's largest value, bf16 / fp16 runs (8 or 11 mantissa bits)
FP32_TOLERANCE = 1e-4  # float32: summation order only
OUT_FEATURES, IN_FEATURES = 88, 192
INT4_GROUP_SIZE = 64


def usable_kernels(kernels: tuple[WeightOnlyKernel, ...], dtype: torch.dtype, device: torch.device
                   ) -> tuple[WeightOnlyKernel, ...]:
    """Those of `kernels` that take this check's weight for `dtype` and answer right on `device`."""
    usable = []
    for kernel in kernels:
        try:
            refusal = check_kernel(kernel, dtype, device)
        except Exception as error:  # noqa: BLE001 - whatever fails to compile or launch here is "not here"
            refusal = f"it failed: {error!r}"[:500]
        if refusal is None:
            usable.append(kernel)
        else:
            log.warning("%s kernel not used on %s for %s: %s", kernel.name, device, dtype, refusal)
    return tuple(usable)


def check_kernel(kernel: WeightOnlyKernel, dtype: torch.dtype, device: torch.device) -> str | None:
    """None when `kernel` matches the reference at every CHECK_ROWS count, else why not. 8-bit codes per
    output channel for a kernel that takes them (int8), else 4-bit codes in groups of INT4_GROUP_SIZE."""
    for bits, group_size in ((8, IN_FEATURES), (4, INT4_GROUP_SIZE)):
        weight = _check_weight(bits, group_size, dtype, device)
        prepared = kernel.prepare(weight, dtype)
        if prepared is not None:
            break
    else:
        return f"it takes neither 8-bit nor 4-bit codes for {dtype}"
    reference = ReferenceKernel().prepare(weight, dtype)
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else TOLERANCE
    generator = torch.Generator().manual_seed(1)
    for num_rows in CHECK_ROWS:
        x = torch.randn(num_rows, IN_FEATURES, generator=generator).to(device=device, dtype=dtype)
        with torch.no_grad():
            y = kernel.apply(prepared, x).float()
            expected = ReferenceKernel().apply(reference, x).float()
        if y.shape != expected.shape:
            return f"its output has shape {tuple(y.shape)}, not {tuple(expected.shape)}"
        error = ((y - expected).abs().max() / expected.abs().max()).item()
        if not error <= tolerance:  # NaN too
            return f"its answers differ from the reference's by {error:.2g} of their scale at {num_rows} rows"
    return None


def _check_weight(bits: int, group_size: int, dtype: torch.dtype, device: torch.device) -> AffineQuantizedWeight:
    generator = torch.Generator().manual_seed(0)
    num_groups = IN_FEATURES // group_size
    q = torch.randint(0, 2**bits, (OUT_FEATURES, IN_FEATURES), generator=generator, dtype=torch.uint8)
    scales = torch.rand(OUT_FEATURES, num_groups, generator=generator) / 50 + 1e-3
    zeros = torch.randint(0, 2**bits, (OUT_FEATURES, num_groups), generator=generator).float()
    input_perm = torch.randperm(IN_FEATURES, generator=generator)
    bias = torch.randn(OUT_FEATURES, generator=generator)
    return AffineQuantizedWeight(q=q.to(device), scales=scales.to(device), zeros=zeros.to(device), bits=bits,
                                 group_size=group_size, input_perm=input_perm.to(device),
                                 bias=bias.to(device=device, dtype=dtype))
