"""The cpu backend: always usable, the default where no accelerator is present (CI, laptops).

Runs the core's torch model code; its own contributions are thread settings, a memory budget that
leaves the machine responsive, oneDNN-packed linear layers, and the dtype this CPU runs fastest.
`TGSERVE_CPU_ISA` (auto | avx2) is read once, by `cpu_kernels`, on the first hook call;
`TGSERVE_CPU_NATIVE_KERNELS` (1 | 0) and `XDG_CACHE_HOME` once, by `native_ops`, at the first quantized load;
the same and `TGSERVE_CPU_NATIVE_ATTENTION` (1 | 0) once, by `native_attention_ops`, at the first model build;
the same and `TGSERVE_CPU_NATIVE_FUSED` (1 | 0) once, by `native_fused_ops`, at the first model build;
`TGSERVE_CPU_NATIVE_KERNELS` also once, by `native_bf16_ops`, at the first bf16 load where oneDNN has no bf16 path;
`TGSERVE_CPU_INT8_ACTIVATIONS` (1 | 0) at each quantized load, by `tgserve_make_linear_method`.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from tgserve.backends.cpu import host
from tgserve.backends.cpu.kernels import ISA_ENV, CpuIsaError, CpuKernels, detect_kernels
from tgserve.backends.cpu.linear import make_onednn_linear_method
from tgserve.backends.cpu.native_attention import make_native_attention
from tgserve.backends.cpu.native_bf16_linear import make_native_bf16_linear_method
from tgserve.backends.cpu.native_fused import make_native_fused_ops
from tgserve.backends.cpu.native_kernels import ATTENTION, BF16_GEMM, FUSED, NativeBuildError, load_ops
from tgserve.backends.cpu.native_weight_only import make_native_kernels
from tgserve.backends.cpu.weight_only import make_weight_only_kernels
from tgserve.core.layers.linear import LinearMethod
from tgserve.core.quantization.registry import make_quantized_method
from tgserve.core.quantization.weight_only import ReferenceKernel
from tgserve.core.backend_status import BackendStatus
from tgserve.core.hookspecs import hookimpl
from tgserve.core.warmup_policy import WarmupPolicy

log = logging.getLogger(__name__)

NAME = "cpu"
# Share of the available RAM (after the weights loaded) that the KV cache and a step's activations
# may take together: the rest stays for the OS, the HTTP server and whatever else the user runs.
MEMORY_SHARE = 0.50
# The KV cache's budget unless --kv-cache-gib says otherwise: vLLM-CPU's default (VLLM_CPU_KVCACHE_SPACE).
# Its pages are touched only as requests use them, so an idle server holds little of it resident.
DEFAULT_KV_CACHE_BYTES = 4 * 2**30
# Start-up probe (WarmupPolicy): real prefill steps of a quarter of this many tokens and (where that is
# quick) this many prove the model path and time it; the default max_batch_prefill_tokens is what a
# PREFILL_STEP_S step computes at the speed fitted through them (core/warmup.py).
# A full 4096-token warmup step took 50 s (float32) and 190 s (bf16 on AVX2) of a 2-core Zen 3 start.
PROBE_TOKENS = 256
PREFILL_STEP_S = 1.0
BLOCK_SIZE_TOKENS = 16


@functools.cache
def cpu_kernels() -> CpuKernels:
    """The ISA and fast paths of this process, from TGSERVE_CPU_ISA (read here only) and the host.

    Decided on the first hook call (the status check at start-up), then fixed for the process.
    Raises CpuIsaError for a value it cannot honour; the status hook turns that into a reason.
    """
    return detect_kernels(os.environ.get(ISA_ENV, "auto"))


NATIVE_ENV = "TGSERVE_CPU_NATIVE_KERNELS"  # "0" turns every native kernel off (weight-only and attention)
# "0" turns only the native paged attention off (native_attention.py): the core's torch attention serves
ATTENTION_ENV = "TGSERVE_CPU_NATIVE_ATTENTION"
# "0" turns only the native fused norm and activation off (native_fused.py): the core's torch ops serve
FUSED_ENV = "TGSERVE_CPU_NATIVE_FUSED"
# "0" keeps bf16 / fp16 activations unrounded in the native kernels (native_weight_only.py) at any batch
INT8_ACTIVATIONS_ENV = "TGSERVE_CPU_INT8_ACTIVATIONS"


@functools.cache
def native_ops():
    """torch.ops.tgserve_cpu (native/weight_only_gemm.cpp, built at first use and cached), or None.

    Called at the first quantized model load, never in a step. None when NATIVE_ENV=0 or the build
    fails; either way one log line says so, and the torch-op kernels serve instead."""
    return _native_or_none(None, (NATIVE_ENV,), "native weight-only kernels", "torch ops serve quantized layers")


@functools.cache
def native_attention_ops():
    """torch.ops.tgserve_cpu_attention (native/paged_attention.cpp, built at first use and cached), or None.

    Called at the first model build, never in a step. None when NATIVE_ENV=0, ATTENTION_ENV=0 or the
    build fails; either way one log line says so, and the core's torch attention serves instead."""
    return _native_or_none(ATTENTION, (NATIVE_ENV, ATTENTION_ENV), "native paged attention",
                           "the core's torch attention serves")


@functools.cache
def native_fused_ops():
    """torch.ops.tgserve_cpu_fused (native/fused_elementwise.cpp, built at first use and cached), or None.

    Called at the first model build, never in a step. None when NATIVE_ENV=0, FUSED_ENV=0 or the build
    fails; either way one log line says so, and the core's torch norm and activation serve instead."""
    return _native_or_none(FUSED, (NATIVE_ENV, FUSED_ENV), "native fused norm and activation",
                           "the core's torch ops serve")


@functools.cache
def native_bf16_ops():
    """torch.ops.tgserve_cpu_bf16 (native/bf16_gemm.cpp, built at first use and cached), or None.

    Called at the first bf16 model load where oneDNN has no bf16 path, never in a step. None when
    NATIVE_ENV=0 or the build fails; either way one log line says so, and F.linear serves bf16 linears."""
    return _native_or_none(BF16_GEMM, (NATIVE_ENV,), "native bf16 GEMM", SLOW_BF16_INSTEAD)


def _native_or_none(library, switches: tuple[str, ...], what: str, instead: str):
    """The ops of `library` (None: the weight-only GEMM's), or None with one log line saying why and
    what serves `instead`: a switch in `switches` set to "0", or a failed build."""
    for env in switches:
        if os.environ.get(env, "1") == "0":
            log.info("%s off (%s=0): %s", what, env, instead)
            return None
    try:
        ops, build_dir, build_s, isa = _load_native(library)
    except NativeBuildError as error:
        log.warning("%s unavailable, %s instead: %s", what, instead, error)
        return None
    log.info("%s (%s ISA) loaded from %s in %.1f s", what, isa, build_dir, build_s)
    return ops


def _load_native(library):
    """(ops, build folder, build seconds, ISA) of `library` (None: the weight-only GEMM's) for this process."""
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tgserve" / "kernels"
    isa = "avx2" if cpu_kernels().is_forced_portable else "native"
    return (*load_ops(cache_root, isa, library), isa)


@hookimpl
def tgserve_get_backend_status():
    num_threads = host.num_physical_cores(host.usable_cpus())
    try:
        kernels = cpu_kernels()
    except CpuIsaError as error:
        return BackendStatus(name=NAME, is_usable=False, reason=str(error))
    isa = f"{kernels.isa}, portable path forced" if kernels.is_forced_portable else kernels.isa
    details = f"{num_threads} threads, {isa}" if isa else f"{num_threads} threads"
    return BackendStatus(name=NAME, is_usable=True, priority=0, device_name=f"cpu ({details})",
                         details=kernels.describe())


@hookimpl
def tgserve_on_startup(config):
    """One intra-op thread per physical core we may run on, shared out among the ranks of a sharded
    server (`--num-shard`: its ranks run here side by side, each computing its shard of every step at
    the same time); one inter-op thread.

    The engine runs one model step at a time, so inter-op parallelism only adds contention.
    """
    num_ranks = config.num_shard or 1
    torch.set_num_threads(max(1, host.num_physical_cores(host.usable_cpus()) // num_ranks))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started in this process
        pass
    kernels = cpu_kernels()
    log.info("CPU kernels: %s", "; ".join(f"{what} {state}" for what, state in kernels.describe()))
    if kernels.is_forced_portable and not kernels.is_torch_portable:
        log.warning("%s=avx2 forces tgserve's portable path, but torch's own kernels still run %s%s: set "
                    "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 before start to run as an AVX2-only CPU",
                    ISA_ENV, kernels.torch_capability, " and oneDNN bf16" if kernels.has_onednn_bf16_isa else "")


@hookimpl
def tgserve_get_device(rank):
    return torch.device("cpu")  # every rank: the ranks of a sharded server share the host


@hookimpl
def tgserve_get_device_count():
    return 1  # one host: `--sharded true` needs `--num-shard N` here


@hookimpl
def tgserve_get_default_dtype():
    """bf16 where native bf16 and the packed bf16 linears both run here, else float32."""
    return cpu_kernels().default_dtype


@hookimpl
def tgserve_get_free_memory_bytes(device):
    return int(host.available_memory_bytes() * MEMORY_SHARE)


@hookimpl
def tgserve_get_default_kv_cache_bytes(device):
    return DEFAULT_KV_CACHE_BYTES


@hookimpl
def tgserve_get_warmup_policy(model_config, config):
    """Activations come from pageable host RAM: check the analytic peak, probe, derive the prefill budget."""
    return WarmupPolicy(probe_tokens=PROBE_TOKENS, prefill_step_s=PREFILL_STEP_S)


@hookimpl
def tgserve_get_dist_backend():
    return "gloo"


@hookimpl
def tgserve_synchronize(device):
    return True  # CPU ops have finished when they return


# The one line `--dtype bfloat16` logs where bf16 has no fast path here: oneDNN's bf16 path without native
# bf16 dot products (AVX-512 without AVX512-BF16), or F.linear where the native bf16 GEMM could not serve.
SLOW_BF16_MESSAGE = "bfloat16 runs through a slower path on this CPU (%s: %s); use --dtype float32 instead"
SLOW_BF16_INSTEAD = "F.linear (bfloat16 runs through a slower path on this CPU; --dtype float32 is faster)"
# The one line saying bf16 linears run the native bf16-weight GEMM (where oneDNN has no bf16 path).
NATIVE_BF16_MESSAGE = "bfloat16 linears on this CPU (%s, oneDNN has no bf16 path): %s, bf16 weights, float32 sums"


@hookimpl
def tgserve_make_linear_method(quantize, dtype, device, quantization):
    """oneDNN-packed weights for unquantized bf16/fp32 where this CPU runs them; for bf16 where oneDNN has
    no bf16 path (AVX2-only CPUs), the native bf16-weight GEMM (native_bf16_linear.py); the core's
    reference method, `F.linear`, elsewhere. A quantized format keeps them for the layers it leaves float
    and gets the packed int8 / int4 kernels that run correctly here for `dtype`: the native ones first
    (native_weight_only.py), then torch's ops (weight_only.py).
    bf16 without a fast path here logs one line saying so."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    kernels = cpu_kernels()
    dense = make_onednn_linear_method(dtype) if kernels.allows_onednn(dtype) else None
    if dtype == torch.bfloat16 and not kernels.is_onednn_bf16:
        dense = _native_bf16_method(kernels)
    elif dtype == torch.bfloat16 and not kernels.has_fast_bf16:
        log.warning(SLOW_BF16_MESSAGE, kernels.isa or "unknown ISA", "no native bf16")
    if quantization is None:
        return dense
    weight_kernels = ()
    if isinstance(dtype, torch.dtype):
        int8_activations = os.environ.get(INT8_ACTIVATIONS_ENV, "1") != "0"
        weight_kernels = (make_native_kernels(dtype, native_ops(), int8_activations)
                          + make_weight_only_kernels(dtype))
    log.info("weight-only kernels for %s: %s", dtype,
             ", ".join(getattr(k, "description", k.name) for k in (*weight_kernels, ReferenceKernel())))
    return make_quantized_method(quantization, dtype, dense=dense or LinearMethod(), kernels=weight_kernels)


def _native_bf16_method(kernels: CpuKernels) -> LinearMethod | None:
    """The native bf16 method where its library built and passed its probe, with one log line either way
    (native_bf16_ops logs a failed build itself); None: F.linear."""
    ops = native_bf16_ops()
    method = make_native_bf16_linear_method(ops)
    if method is not None:
        log.info(NATIVE_BF16_MESSAGE, kernels.isa or "unknown ISA", method.name)
    elif ops is not None:
        log.warning(SLOW_BF16_MESSAGE, kernels.isa or "unknown ISA", "the native bf16 GEMM failed its probe")
    return method


@hookimpl
def tgserve_get_block_size():
    return BLOCK_SIZE_TOKENS


@hookimpl
def tgserve_make_attention(model_config, block_size, device, dtype):
    """The native paged attention (native_attention.py) where it built and passed its probe for `dtype`;
    else None, and the core's torch reference serves. Decode rows run native, prefill rows the reference."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        return None
    attention = make_native_attention(native_attention_ops(), model_config.num_attention_heads,
                                      model_config.num_key_value_heads, model_config.head_dim, block_size, dtype)
    log.info("paged attention for %s: %s", dtype, attention.name if attention else "the core's torch reference")
    return attention


@hookimpl
def tgserve_make_fused_ops(dtype, device):
    """The native fused RMSNorm (+ residual) and SiLU-and-multiply (native_fused.py) where they built and
    passed their probe for `dtype`; else None, and the core's torch reference serves."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        return None
    ops = make_native_fused_ops(native_fused_ops(), dtype)
    log.info("norm and activation for %s: %s", dtype, ops.name if ops else "the core's torch reference")
    return ops
