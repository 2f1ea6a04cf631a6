"""What a backend says about itself when asked whether it can run here."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class BackendStatus:
    """One backend's answer to `tgserve_get_backend_status`."""

    name: str  # the name users pass to --backend, equal to the entry-point name
    is_usable: bool  # its SDK imports and its device is present
    priority: int = 0  # higher wins under --backend auto (cpu is 0, accelerators above it)
    reason: str = ""  # why it is not usable, one line; empty when usable
    install_hint: str = ""  # e.g. "pip install tgserve[gaudi]"
    device_name: str = ""  # e.g. "NVIDIA H100 80GB HBM3", "cpu (2 threads)"
    # (what, state) rows `tgserve backends` prints under the table for a usable backend: the ISA or
    # kernels it runs and which fast paths are on, e.g. (("native bf16", "yes"),). Empty: none.
    details: tuple[tuple[str, str], ...] = ()
