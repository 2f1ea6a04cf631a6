"""The rocm backend: AMD Instinct / Radeon GPUs through a ROCm (HIP) build of torch.

A HIP build of torch answers through the `torch.cuda` API, so the device, memory and sync hooks are
the cuda backend's shared ones, and so are the Triton weight-only kernels for quantized layers (Triton
runs on ROCm); what differs is detection, the hint and, later, attention kernels.
"""
from __future__ import annotations

import torch

from tgserve.backends.cuda.torch_gpu import (gpu_status, tgserve_get_default_dtype, tgserve_get_device,
                                             tgserve_get_device_count, tgserve_get_dist_backend,
                                             tgserve_get_free_memory_bytes, tgserve_make_linear_method,
                                             tgserve_make_step_inputs, tgserve_on_sharding, tgserve_synchronize)
from tgserve.core.backend_status import BackendStatus
from tgserve.core.hookspecs import hookimpl

NAME = "rocm"
PRIORITY = 100
INSTALL_HINT = "pip install tgserve[rocm] with a ROCm build of torch"
__all__ = ["tgserve_get_backend_status", "tgserve_get_device", "tgserve_get_device_count", "tgserve_on_sharding",
           "tgserve_get_default_dtype",
           "tgserve_get_free_memory_bytes", "tgserve_get_dist_backend", "tgserve_synchronize",
           "tgserve_make_step_inputs", "tgserve_make_linear_method"]


@hookimpl
def tgserve_get_backend_status():
    if torch.version.hip is None:
        return BackendStatus(name=NAME, is_usable=False, priority=PRIORITY, install_hint=INSTALL_HINT,
                             reason="this torch build has no ROCm/HIP support")
    return gpu_status(NAME, PRIORITY, INSTALL_HINT, vendor="AMD", label=f" (HIP {torch.version.hip})")
