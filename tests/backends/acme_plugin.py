"""A vendor's backend plugin, as `pip install tgserve-acme` would ship it: the source of `acmeplug/plugin.py`.

`test_third_party_backend_serves` copies this file into a temporary `acmeplug` package with an
`acmeplug-0.1.dist-info` that declares it under `tgserve.backends`; nothing in tgserve names it.
It stands in for an accelerator this machine lacks: every tensor stays on the CPU. What makes it
observable is its journal: each lifecycle hook appends one JSON line to the file named by the
`ACME_MARKER` environment variable (read when the hook runs, never at import), so the test can
see which hooks ran, in which process, and with what the core handed them.
"""
from __future__ import annotations

import json
import os

import torch

from tgserve.core.backend_status import BackendStatus
from tgserve.core.hookspecs import hookimpl
from tgserve.core.layers.linear import LinearMethod

NAME = "acme"
PRIORITY = 500  # above the cpu backend (0), so `--backend auto` picks acme
DEVICE_NAME = "ACME test accelerator"
BLOCK_SIZE_TOKENS = 8  # differs from the core default (16), so the test can tell whose answer won
FREE_MEMORY_BYTES = 2 << 30


class AcmeLinearMethod(LinearMethod):
    """The reference matmul, counting its calls: proof that the core used the plugin's method."""

    name = "acme"
    num_applies = 0  # calls of `apply` in this process, every layer together; engine thread only

    def apply(self, params: object, x: torch.Tensor) -> torch.Tensor:
        AcmeLinearMethod.num_applies += 1
        return super().apply(params, x)


def _record(hook: str, **fields: object) -> None:
    """Append `{"hook": hook, "pid": ..., **fields}` as one line to $ACME_MARKER."""
    with open(os.environ["ACME_MARKER"], "a", encoding="utf-8") as marker:
        marker.write(json.dumps({"hook": hook, "pid": os.getpid(), **fields}) + "\n")


@hookimpl
def tgserve_get_backend_status():
    return BackendStatus(name=NAME, is_usable=True, priority=PRIORITY, device_name=DEVICE_NAME)


@hookimpl
def tgserve_on_startup(config):
    _record("tgserve_on_startup", backend=config.backend)


@hookimpl
def tgserve_get_device(rank):
    return torch.device("cpu")


@hookimpl
def tgserve_get_default_dtype():
    return "float32"


@hookimpl
def tgserve_get_free_memory_bytes(device):
    return FREE_MEMORY_BYTES


@hookimpl
def tgserve_get_dist_backend():
    return "gloo"


@hookimpl
def tgserve_synchronize(device):
    return True


@hookimpl
def tgserve_get_block_size():
    return BLOCK_SIZE_TOKENS


@hookimpl
def tgserve_make_linear_method(quantize, dtype, device, quantization):
    return AcmeLinearMethod() if quantize is None else None


@hookimpl
def tgserve_on_model_ready(model, kv_cache, limits):
    _record("tgserve_on_model_ready", block_size=kv_cache.block_size, num_blocks=kv_cache.num_blocks,
            max_total_tokens=limits.max_total_tokens, num_applies=AcmeLinearMethod.num_applies)


@hookimpl
def tgserve_on_shutdown():
    _record("tgserve_on_shutdown", num_applies=AcmeLinearMethod.num_applies)
