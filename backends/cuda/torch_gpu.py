"""Hooks shared by the backends that drive GPUs through torch's `torch.cuda` API.

A CUDA build and a ROCm (HIP) build of torch answer the same calls (HIP devices keep the "cuda"
device type, RCCL serves under the "nccl" name), so cuda and rocm differ only in detection and
hints; they re-export these implementations as their own hooks. Triton (the `cuda` / `rocm` extra)
runs on both, so the weight-only kernels of `triton_weight_only.py` serve both as well.
"""
from __future__ import annotations

import importlib
import logging

import torch

from tgserve.backends.cuda import kernel_check, shm_check
from tgserve.core.backend_status import BackendStatus
from tgserve.core.hookspecs import hookimpl
from tgserve.core.layers.linear import LinearMethod
from tgserve.core.quantization.registry import make_quantized_method
from tgserve.core.quantization.weight_only import WeightOnlyKernel
from tgserve.core.step_inputs import StepInputs

log = logging.getLogger(__name__)

TRITON_KERNELS_MODULE = "tgserve.backends.cuda.triton_weight_only"
NO_TRITON_MESSAGE = ("triton does not import (%s): quantized layers run the reference kernel (dequantize and "
                     "matmul per step); pip install tgserve[cuda] (or tgserve[rocm]) for the Triton kernels")


def gpu_status(name: str, priority: int, install_hint: str, vendor: str, label: str = "") -> BackendStatus:
    """Usable when torch sees a GPU; a driver error or no device is a reason, never an exception."""
    try:
        is_available = torch.cuda.is_available()
        device_name = torch.cuda.get_device_name(0) if is_available else ""
    except Exception as error:  # a broken driver must read as "not usable", never crash the listing
        return BackendStatus(name=name, is_usable=False, priority=priority, install_hint=install_hint,
                             reason=f"{vendor} initialisation failed: {error!r}")
    if not is_available:
        return BackendStatus(name=name, is_usable=False, priority=priority, install_hint=install_hint,
                             reason=f"no {vendor} GPU visible (torch.cuda.is_available() is False)")
    count = torch.cuda.device_count()
    device_name = f"{device_name}{label}"
    return BackendStatus(name=name, is_usable=True, priority=priority,
                         device_name=device_name if count == 1 else f"{count}x {device_name}")


@hookimpl
def tgserve_get_device(rank):
    return torch.device("cuda", rank % torch.cuda.device_count())


@hookimpl
def tgserve_get_device_count():
    return torch.cuda.device_count()  # the GPUs CUDA_VISIBLE_DEVICES (HIP_VISIBLE_DEVICES) leaves visible


@hookimpl
def tgserve_on_sharding(world_size, num_local_ranks):
    """Warn, with the fix, where /dev/shm is too small for NCCL between this machine's ranks."""
    shortfall = shm_check.shm_shortfall() if num_local_ranks > 1 else None
    if shortfall:
        log.warning("%s", shortfall)


@hookimpl
def tgserve_get_default_dtype():
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"  # bf16 needs Ampere / CDNA2 or newer


@hookimpl
def tgserve_get_free_memory_bytes(device):
    free_bytes, _total_bytes = torch.cuda.mem_get_info(device)
    return free_bytes


@hookimpl
def tgserve_get_dist_backend():
    return "nccl"  # NCCL on CUDA builds; a ROCm build serves RCCL under the same name


@hookimpl
def tgserve_synchronize(device):
    torch.cuda.synchronize(device)
    return True


@hookimpl
def tgserve_make_step_inputs(capacity, block_size, constraints, device):
    """The core's step inputs staged in pinned host memory: the per-field copies to the GPU run async."""
    return StepInputs(capacity, block_size, device, constraints, is_pinned=True)


def import_triton_kernels():
    """The Triton kernels' module; raises ImportError where triton is missing or broken (tests replace
    this to simulate that)."""
    return importlib.import_module(TRITON_KERNELS_MODULE)


def triton_kernels(dtype: torch.dtype, device: torch.device) -> tuple[WeightOnlyKernel, ...]:
    """The Triton weight-only kernels that pass their start-up check here (`kernel_check`), each one left
    out logged with why; none, with one log line, where triton does not import (the reference serves)."""
    try:
        module = import_triton_kernels()
    except ImportError as error:
        log.warning(NO_TRITON_MESSAGE, error)
        return ()
    return kernel_check.usable_kernels(module.make_triton_kernels(), dtype, device)


@hookimpl
def tgserve_make_linear_method(quantize, dtype, device, quantization):
    """A quantized format's method with the Triton int8 / int4 kernels (those that pass a start-up check
    on `device`) tried before the reference; None for unquantized weights (the core's `F.linear` method,
    cuBLAS / hipBLASLt, is what we want)."""
    if quantization is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kernels = triton_kernels(dtype, torch.device(device))
    log.info("weight-only kernels for %s: %s", dtype, ", ".join(k.name for k in kernels) or "reference only")
    return make_quantized_method(quantization, dtype, dense=LinearMethod(), kernels=kernels)
