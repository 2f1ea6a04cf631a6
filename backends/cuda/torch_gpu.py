"""Hooks shared by the backends that drive GPUs through torch's `torch.cuda` API.

A CUDA build and a ROCm (HIP) build of torch answer the same calls (HIP devices keep the "cuda"
device type, RCCL serves under the "nccl" name), so cuda and rocm differ only in detection and
hints; they re-export these implementations as their own hooks.
"""
from __future__ import annotations

import torch

from tgserve.core.backend_status import BackendStatus
from tgserve.core.hookspecs import hookimpl
from tgserve.core.step_inputs import StepInputs


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
