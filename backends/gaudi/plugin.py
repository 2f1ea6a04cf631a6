"""The gaudi backend: Intel Gaudi HPUs through the Intel Gaudi software stack (habana_frameworks).

Detection, device, communicator and the static shapes HPU graphs need are here; model execution
(HPU graphs, optimum-habana kernels) is not implemented yet, so the core's torch model runs.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

from tgserve.backends.gaudi import buckets
from tgserve.core.backend_status import BackendStatus
from tgserve.core.hookspecs import hookimpl
from tgserve.core.shape_constraints import ShapeConstraints

NAME = "gaudi"
PRIORITY = 100
INSTALL_HINT = "pip install tgserve[gaudi] on a machine with the Intel Gaudi software stack"
BLOCK_SIZE_TOKENS = 128  # Gaudi's matrix engines work on 128-wide tiles


def _hpu():
    """`habana_frameworks.torch.hpu`, or None when the SDK is absent or fails to load."""
    try:
        if importlib.util.find_spec("habana_frameworks") is None:
            return None
        return importlib.import_module("habana_frameworks.torch.hpu")
    except Exception:  # a half-installed SDK raises all sorts; the status reports it as missing
        return None


@hookimpl
def tgserve_get_backend_status():
    hpu = _hpu()
    if hpu is None:
        return BackendStatus(name=NAME, is_usable=False, priority=PRIORITY, install_hint=INSTALL_HINT,
                             reason="habana_frameworks is not installed (Intel Gaudi SDK)")
    try:
        if not hpu.is_available():
            return BackendStatus(name=NAME, is_usable=False, priority=PRIORITY, install_hint=INSTALL_HINT,
                                 reason="no Gaudi HPU found")
        device_name = f"{hpu.device_count()}x {hpu.get_device_name()}"
    except Exception as error:
        return BackendStatus(name=NAME, is_usable=False, priority=PRIORITY, install_hint=INSTALL_HINT,
                             reason=f"Gaudi initialisation failed: {error!r}")
    return BackendStatus(name=NAME, is_usable=True, priority=PRIORITY, device_name=device_name)


@hookimpl
def tgserve_get_device(rank):
    return torch.device("hpu")  # the Gaudi runtime maps each process to its own card


@hookimpl
def tgserve_get_default_dtype():
    return "bfloat16"


@hookimpl
def tgserve_get_free_memory_bytes(device):
    stats = _hpu().memory_stats()
    return stats["Limit"] - stats["InUse"]


@hookimpl
def tgserve_get_dist_backend():
    return "hccl"


@hookimpl
def tgserve_synchronize(device):
    _hpu().synchronize()
    return True


@hookimpl
def tgserve_get_block_size():
    return BLOCK_SIZE_TOKENS


@hookimpl
def tgserve_get_shape_constraints(model_config, config):
    """Batch sizes in powers of two, prompt lengths in multiples of 128; whole-prompt prefill only."""
    max_batch_size = config.max_batch_size or buckets.DEFAULT_MAX_BATCH_SIZE
    max_input_tokens = config.max_input_tokens or min(buckets.DEFAULT_MAX_INPUT_TOKENS,
                                                      model_config.max_position_embeddings)
    return ShapeConstraints(
        max_batch_size=max_batch_size,
        prefill_token_buckets=buckets.sequence_buckets(max_input_tokens),
        decode_batch_buckets=buckets.batch_buckets(max_batch_size),
        supports_chunked_prefill=False,
    )
