"""The cuda backend: NVIDIA GPUs through a CUDA build of torch, NCCL between ranks.

It runs the core's torch model code, with Triton weight-only kernels for quantized layers
(triton_weight_only.py); flash kernels and CUDA graphs arrive as implementations of the attention and
model-ready hooks.
"""
from __future__ import annotations

import torch

from tgserve.backends.cuda.torch_gpu import (gpu_status, tgserve_get_default_dtype, tgserve_get_device,
                                             tgserve_get_device_count, tgserve_get_dist_backend,
                                             tgserve_get_free_memory_bytes, tgserve_make_linear_method,
                                             tgserve_make_step_inputs, tgserve_on_sharding, tgserve_synchronize)
from tgserve.core.backend_status import BackendStatus
from tgserve.core.hookspecs import hookimpl

NAME = "cuda"
PRIORITY = 100
INSTALL_HINT = "pip install tgserve[cuda] (and a CUDA build of torch)"
__all__ = ["tgserve_get_backend_status", "tgserve_get_device", "tgserve_get_device_count", "tgserve_on_sharding",
           "tgserve_get_default_dtype",
           "tgserve_get_free_memory_bytes", "tgserve_get_dist_backend", "tgserve_synchronize",
           "tgserve_make_step_inputs", "tgserve_make_linear_method"]


@hookimpl
def tgserve_get_backend_status():
    if torch.version.cuda is None:
        reason = ("this torch build is for ROCm, not CUDA (use --backend rocm)" if torch.version.hip
                  else "this torch build has no CUDA (CPU-only build)")
        return BackendStatus(name=NAME, is_usable=False, priority=PRIORITY, reason=reason, install_hint=INSTALL_HINT)
    return gpu_status(NAME, PRIORITY, INSTALL_HINT, vendor="NVIDIA")
