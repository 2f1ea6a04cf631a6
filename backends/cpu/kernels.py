"""Which CPU kernels this process runs: the instruction set, the fast paths, the default dtype.

Two kinds of x86-64 CPU serve the same models differently. With native bf16 (AVX512-BF16 or
AMX: Sapphire Rapids, Zen 4/5) oneDNN packs bf16 weights and bf16 is the fastest correct dtype.
With AVX2 only (Zen 3 and older), oneDNN has no bf16 path at all ("bf16 path needs the cpu
support avx_ne_convert or avx512bw, avx512vl and avx512dq"): there bf16 linears run the backend's
native bf16-weight GEMM (native_bf16_linear.py), or `F.linear`, which widens to fp32 on every call,
where that library cannot build. float32 stays the default there.

`TGSERVE_CPU_ISA=avx2` makes a capable CPU take the AVX2-only path, so CI on an AVX-512 machine
tests it too. It changes tgserve's own choices; torch's vectorized kernels and oneDNN's GEMMs pick
their ISA when torch loads, so an exact AVX2 run also sets, before the process starts,
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` (both reported here, so a partial one shows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tgserve.backends.cpu import host

ISA_ENV = "TGSERVE_CPU_ISA"
ISA_CHOICES = ("auto", "avx2")  # auto: detect; avx2: the portable path an AVX2-only CPU takes
PORTABLE_ISA = "avx2"


class CpuIsaError(ValueError):
    """`TGSERVE_CPU_ISA` names an ISA tgserve cannot force on this CPU. The message says which."""


@dataclass(slots=True, frozen=True)
class CpuKernels:
    """What the cpu backend runs in this process; decided once, at start-up."""

    isa: str  # the matmul ISA tgserve's choices assume, e.g. "avx512_bf16", "avx2"; "" if unknown
    cpu_isa: str  # the best ISA the CPU itself has (differs from `isa` when forced)
    torch_capability: str  # ATen's vectorized kernels: "AVX512", "AVX2", "DEFAULT", ...
    is_native_bf16: bool  # bf16 dot products in hardware, and tgserve may count on them
    is_onednn_fp32: bool  # oneDNN-packed fp32 linears (backends/cpu/linear.py) may run here
    is_onednn_bf16: bool  # oneDNN-packed bf16 linears may run here (oneDNN has a bf16 path)
    is_forced_portable: bool  # TGSERVE_CPU_ISA=avx2
    has_onednn_bf16_isa: bool  # oneDNN itself has a bf16 path (not on AVX2-only CPUs, nor under
    #                            ONEDNN_MAX_CPU_ISA=AVX2); `is_onednn_bf16` is False when forced anyway

    @property
    def default_dtype(self) -> str:
        """bf16 only where it is fast (native bf16 and packed bf16 linears), else float32."""
        return "bfloat16" if self.has_fast_bf16 else "float32"

    @property
    def has_fast_bf16(self) -> bool:
        return self.is_native_bf16 and self.is_onednn_bf16

    @property
    def is_torch_portable(self) -> bool:
        """Whether torch and oneDNN themselves run no more than an AVX2-only CPU would."""
        return self.torch_capability.upper() in ("AVX2", "DEFAULT") and not self.has_onednn_bf16_isa

    def allows_onednn(self, dtype: torch.dtype | None) -> bool:
        """Whether the oneDNN-packed linear may be tried for `dtype` (it still probes itself)."""
        return {torch.float32: self.is_onednn_fp32, torch.bfloat16: self.is_onednn_bf16}.get(dtype, False)

    def describe(self) -> tuple[tuple[str, str], ...]:
        """(what, state) rows for `tgserve backends` and the start-up log."""
        if self.is_forced_portable:
            forced = f"yes ({ISA_ENV}={PORTABLE_ISA}; the CPU has {self.cpu_isa or 'unknown'})"
        else:
            forced = f"no ({ISA_ENV}=auto)"
        return (("kernel ISA", self.isa or "unknown"),
                ("portable path forced", forced),
                ("torch CPU capability", self.torch_capability),
                ("oneDNN packed fp32 linears", _on_off(self.is_onednn_fp32)),
                ("oneDNN packed bf16 linears", _on_off(self.is_onednn_bf16) + (
                    " (oneDNN has a bf16 path: ONEDNN_MAX_CPU_ISA=AVX2 removes it)"
                    if self.is_forced_portable and self.has_onednn_bf16_isa else "")),
                ("native bf16", "yes" if self.is_native_bf16 else "no"),
                ("default dtype", self.default_dtype))


def detect_kernels(requested_isa: str) -> CpuKernels:
    """The kernels for `requested_isa` (a value of TGSERVE_CPU_ISA) on this CPU and torch build.

    Cheap and compute-free (no tensor op, so no OpenMP pool on the calling thread): /proc/cpuinfo,
    torch's dispatch level and oneDNN's own bf16 check. Raises CpuIsaError for a bad request.
    """
    has_onednn = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                  and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    return choose_kernels(requested_isa, host.cpu_flags(), torch.backends.cpu.get_cpu_capability(),
                          has_onednn, has_onednn and _onednn_has_bf16())


def choose_kernels(requested_isa: str, flags: set[str], torch_capability: str, has_onednn: bool,
                   has_onednn_bf16: bool) -> CpuKernels:
    """Decide from the facts: CPU `flags` (empty when unknown), torch's capability, oneDNN's answers."""
    requested = requested_isa.strip().lower() or "auto"
    if requested not in ISA_CHOICES:
        raise CpuIsaError(f"{ISA_ENV} must be one of {', '.join(ISA_CHOICES)}. Given: {requested_isa}")
    cpu_isa = host.best_isa(flags)
    if requested == PORTABLE_ISA:
        if flags and PORTABLE_ISA not in flags:
            raise CpuIsaError(f"{ISA_ENV}={PORTABLE_ISA}, but this CPU has no AVX2 (best: {cpu_isa or 'unknown'})")
        return CpuKernels(isa=PORTABLE_ISA, cpu_isa=cpu_isa, torch_capability=torch_capability,
                          is_native_bf16=False, is_onednn_fp32=has_onednn, is_onednn_bf16=False,
                          is_forced_portable=True, has_onednn_bf16_isa=has_onednn_bf16)
    # Without /proc/cpuinfo (not Linux) oneDNN's bf16 check is the only word on native bf16.
    is_native_bf16 = host.has_native_bf16(flags) if flags else has_onednn_bf16
    return CpuKernels(isa=cpu_isa, cpu_isa=cpu_isa, torch_capability=torch_capability,
                      is_native_bf16=is_native_bf16, is_onednn_fp32=has_onednn, is_onednn_bf16=has_onednn_bf16,
                      is_forced_portable=False, has_onednn_bf16_isa=has_onednn_bf16)


def _onednn_has_bf16() -> bool:
    """oneDNN's own answer, which also honours ONEDNN_MAX_CPU_ISA (False on AVX2-only CPUs)."""
    is_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(is_supported()) if is_supported is not None else False
    except RuntimeError:
        return False


def _on_off(is_on: bool) -> str:
    return "on" if is_on else "off"
