"""A test backend: the cpu backend plus one fault a test can inject, installed like a vendor's plugin.

`tests/backends/plugin_install.py` lays this file out as package `faultyplug` with a dist-info that
declares `faulty = faultyplug.plugin` under `tgserve.backends`; a server started with that directory
on PYTHONPATH and `--backend faulty` runs it. Nothing in tgserve names it, and nothing in the server
is patched: the fault enters where a real device fault would, in the model step.

Every hook but two is the cpu backend's own function, so the server computes exactly as on
`--backend cpu`. The model is the core's model wrapped: while the file named by
`TGSERVE_TEST_FAULT_FILE` (read when the model is built, never at import) exists, the next model
forward deletes it and raises `InjectedDeviceFault` with the file's text as the message, or, when
the text starts with `VALUE_ERROR_PREFIX`, a plain `ValueError` with the rest (a bug deep in a
model, which the server must not mistake for the client's validation error). So one file written
by a test fails exactly one engine step, the way a lost device fails a step: every request in that
step fails, the engine keeps serving.
"""
from __future__ import annotations

import os
from pathlib import Path

from tgserve.backends.cpu.plugin import (  # noqa: F401  (re-exported: these are this plugin's hooks)
    tgserve_get_block_size,
    tgserve_get_default_dtype,
    tgserve_get_default_kv_cache_bytes,
    tgserve_get_device,
    tgserve_get_dist_backend,
    tgserve_get_free_memory_bytes,
    tgserve_get_warmup_policy,
    tgserve_make_linear_method,
    tgserve_on_startup,
    tgserve_synchronize,
)
from tgserve.core import default_plugin
from tgserve.core.backend_status import BackendStatus
from tgserve.core.hookspecs import hookimpl

NAME = "faulty"
FAULT_FILE_ENV = "TGSERVE_TEST_FAULT_FILE"
PRIORITY = -1  # below cpu (0): `--backend auto` never picks it, only `--backend faulty` does
VALUE_ERROR_PREFIX = "ValueError: "  # a fault text starting so raises ValueError(rest of the text)


class InjectedDeviceFault(RuntimeError):
    """The fault a test asked for: raised by one model forward."""


class FaultyModel:
    """The core's model, except that a forward fails once each time the fault file appears."""

    def __init__(self, model: object, fault_file: Path):
        self._model = model
        self._fault_file = fault_file

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def forward(self, batch, kv_cache):
        try:
            message = self._fault_file.read_text()
        except FileNotFoundError:
            return self._model.forward(batch, kv_cache)
        self._fault_file.unlink()
        if message.startswith(VALUE_ERROR_PREFIX):
            raise ValueError(message[len(VALUE_ERROR_PREFIX):])
        raise InjectedDeviceFault(message)


@hookimpl
def tgserve_get_backend_status():
    return BackendStatus(name=NAME, is_usable=True, priority=PRIORITY, device_name="cpu with injectable faults")


@hookimpl
def tgserve_make_model(model_config, device, dtype, linear_method, attention, tensor_parallel, fused_ops):
    model = default_plugin.tgserve_make_model(model_config=model_config, device=device, dtype=dtype,
                                              linear_method=linear_method, attention=attention,
                                              tensor_parallel=tensor_parallel, fused_ops=fused_ops)
    return FaultyModel(model, Path(os.environ[FAULT_FILE_ENV]))
