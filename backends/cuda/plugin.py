"""The cuda backend: NVIDIA GPUs through a CUDA build of torch, NCCL between ranks.

It runs the core's torch model code for now; Triton / flash kernels and CUDA graphs arrive as
implementations of the attention, linear-method and model-ready hooks.
"""
from __future__ import annotations

import torch

from tgserve.core.backend_status import BackendStatus
from tgserve.core.hookspecs import hookimpl

NAME = "cuda"
PRIORITY = 100
INSTALL_HINT = "pip install tgserve[cuda] (and a CUDA build of torch)"


@hookimpl
def tgserve_get_backend_status():
    if torch.version.cuda is None:
        reason = ("this torch build is for ROCm, not CUDA (use --backend rocm)" if torch.version.hip
                  else "this torch build has no CUDA (CPU-only build)")
        return BackendStatus(name=NAME, is_usable=False, priority=PRIORITY, reason=reason, install_hint=INSTALL_HINT)
    try:
        is_available = torch.cuda.is_available()
        device_name = torch.cuda.get_device_name(0) if is_available else ""
    except Exception as error:  # a broken driver must read as "not usable", never crash the listing
        return BackendStatus(name=NAME, is_usable=False, priority=PRIORITY, install_hint=INSTALL_HINT,
                             reason=f"CUDA initialisation failed: {error!r}")
    if not is_available:
        return BackendStatus(name=NAME, is_usable=False, priority=PRIORITY, install_hint=INSTALL_HINT,
                             reason="no NVIDIA GPU visible (torch.cuda.is_available() is False)")
    count = torch.cuda.device_count()
    name = device_name if count == 1 else f"{count}x {device_name}"
    return BackendStatus(name=NAME, is_usable=True, priority=PRIORITY, device_name=name)


@hookimpl
def tgserve_get_device(rank):
    return torch.device("cuda", rank % torch.cuda.device_count())


@hookimpl
def tgserve_get_default_dtype():
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"  # bf16 needs Ampere or newer


@hookimpl
def tgserve_get_free_memory_bytes(device):
    free_bytes, _total_bytes = torch.cuda.mem_get_info(device)
    return free_bytes


@hookimpl
def tgserve_get_dist_backend():
    return "nccl"


@hookimpl
def tgserve_synchronize(device):
    torch.cuda.synchronize(device)
    return True
