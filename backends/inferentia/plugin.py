"""The inferentia backend: AWS Inferentia2 / Trainium through the Neuron SDK (optimum-neuron).

Neuron compiles the model for one batch size and one sequence length, and each request keeps one
batch slot for its whole life; the shape constraints tell the scheduler so. Model execution (the
compiled optimum-neuron model) is not implemented yet.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from tgserve.core.backend_status import BackendStatus
from tgserve.core.hookspecs import hookimpl
from tgserve.core.shape_constraints import ShapeConstraints

NAME = "inferentia"
PRIORITY = 100
INSTALL_HINT = "pip install tgserve[inferentia] on an AWS Inferentia2/Trainium instance (Neuron SDK)"
NEURON_DEVICE_PATH = Path("/dev/neuron0")  # created by the aws-neuronx-dkms driver
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_MAX_TOTAL_TOKENS = 4096


def _is_importable(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except Exception:  # parent missing or broken on import, or a module without a spec: not usable
        return False


def _missing() -> str:
    """Why this backend cannot run here, or "" when it can."""
    if not _is_importable("optimum") or not _is_importable("optimum.neuron"):
        return "optimum-neuron is not installed (AWS Neuron SDK)"
    if not _is_importable("torch_neuronx"):
        return "torch-neuronx is not installed (AWS Neuron SDK)"
    if not NEURON_DEVICE_PATH.exists():
        return f"no Neuron device found ({NEURON_DEVICE_PATH} does not exist)"
    return ""


HBM_BYTES_PER_DEVICE = 32 << 30


@hookimpl
def tgserve_get_backend_status():
    reason = _missing()
    if reason:
        return BackendStatus(name=NAME, is_usable=False, priority=PRIORITY, reason=reason, install_hint=INSTALL_HINT)
    num_devices = len(list(NEURON_DEVICE_PATH.parent.glob("neuron[0-9]*")))
    return BackendStatus(name=NAME, is_usable=True, priority=PRIORITY, device_name=f"{num_devices}x AWS Neuron device")


@hookimpl
def tgserve_get_device(rank):
    return torch.device("xla") if not _missing() else None


@hookimpl
def tgserve_get_default_dtype():
    return "bfloat16"


@hookimpl
def tgserve_get_dist_backend():
    return "xla"


@hookimpl
def tgserve_get_free_memory_bytes(device):
    """HBM of the Neuron devices found (32 GiB per Inferentia2 device); the compiled model owns its KV."""
    return HBM_BYTES_PER_DEVICE * len(list(NEURON_DEVICE_PATH.parent.glob("neuron[0-9]*")))


@hookimpl
def tgserve_synchronize(device):
    import torch_xla.core.xla_model as xm  # present whenever this backend is usable

    xm.wait_device_ops()
    return True


@hookimpl
def tgserve_get_shape_constraints(model_config, config):
    """One compiled batch of slots, one compiled sequence length, whole-prompt prefill only."""
    return ShapeConstraints(
        max_batch_size=config.max_batch_size or DEFAULT_MAX_BATCH_SIZE,
        max_tokens_per_sequence=config.max_total_tokens or DEFAULT_MAX_TOTAL_TOKENS,
        is_slot_based=True,
        supports_chunked_prefill=False,
    )
