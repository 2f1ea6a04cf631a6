"""The rocm backend: AMD Instinct / Radeon GPUs through a ROCm (HIP) build of torch.

A HIP build of torch answers through the `torch.cuda` API (devices are named "cuda"), so the calls
below read like the cuda backend's; what differs is detection, the hint and, later, the kernels.
"""
from __future__ import annotations

import torch

from tgserve.core.backend_status import BackendStatus
from tgserve.core.hookspecs import hookimpl

NAME = "rocm"
PRIORITY = 100
INSTALL_HINT = "pip install tgserve[rocm] with a ROCm build of torch"


@hookimpl
def tgserve_get_backend_status():
    if torch.version.hip is None:
        return BackendStatus(name=NAME, is_usable=False, priority=PRIORITY, install_hint=INSTALL_HINT,
                             reason="this torch build has no ROCm/HIP support")
    try:
        is_available = torch.cuda.is_available()
        device_name = torch.cuda.get_device_name(0) if is_available else ""
    except Exception as error:  # a broken driver must read as "not usable", never crash the listing
        return BackendStatus(name=NAME, is_usable=False, priority=PRIORITY, install_hint=INSTALL_HINT,
                             reason=f"HIP initialisation failed: {error!r}")
    if not is_available:
        return BackendStatus(name=NAME, is_usable=False, priority=PRIORITY, install_hint=INSTALL_HINT,
                             reason="no AMD GPU visible (check /dev/kfd access and HIP_VISIBLE_DEVICES)")
    count = torch.cuda.device_count()
    name = f"{device_name} (HIP {torch.version.hip})"
    return BackendStatus(name=NAME, is_usable=True, priority=PRIORITY, device_name=name if count == 1 else f"{count}x {name}")


@hookimpl
def tgserve_get_device(rank):
    return torch.device("cuda", rank % torch.cuda.device_count())  # HIP devices keep torch's "cuda" type


@hookimpl
def tgserve_get_default_dtype():
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


@hookimpl
def tgserve_get_free_memory_bytes(device):
    free_bytes, _total_bytes = torch.cuda.mem_get_info(device)
    return free_bytes


@hookimpl
def tgserve_get_dist_backend():
    return "nccl"  # a ROCm build of torch serves RCCL under the "nccl" backend name


@hookimpl
def tgserve_synchronize(device):
    torch.cuda.synchronize(device)
    return True
