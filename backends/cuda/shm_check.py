"""Is /dev/shm big enough for NCCL (or RCCL) between the ranks on this machine?

Where GPUs cannot reach each other directly (no NVLink / PCIe peer access, as in many clouds and
containers), NCCL moves data between the ranks of one machine through shared-memory segments in
/dev/shm. Docker gives a container 64 MiB there by default: NCCL then fails at its first large
collective ("unhandled system error", or a bus error), long after start-up. TGI's documentation asks
for `--shm-size 1g`; we check at start and say so, as a warning, because machines whose GPUs are peers
never use that path. NCCL_SHM_DISABLE=1 (NCCL's own switch) turns the transport off, and the check.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

SHM_PATH = "/dev/shm"
MIN_SHM_BYTES = 1 << 30  # TGI's `--shm-size 1g`


def shm_shortfall(path: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The warning for ranks sharing this machine through `path` (default SHM_PATH), or None when it
    holds MIN_SHM_BYTES or NCCL's shared-memory transport is off (`environ`, default the process's)."""
    path = path or SHM_PATH
    environ = os.environ if environ is None else environ
    if environ.get("NCCL_SHM_DISABLE", "0") not in ("", "0"):
        return None
    try:
        stats = os.statvfs(path)
    except OSError as error:
        return (f"{path} is not usable ({error.strerror}): NCCL between GPUs without peer access needs it; "
                f"mount a tmpfs of at least 1 GiB there (docker run --shm-size 1g)")
    size_bytes = stats.f_frsize * stats.f_blocks
    if size_bytes >= MIN_SHM_BYTES:
        return None
    return (f"{path} holds only {size_bytes / (1 << 20):.0f} MiB: NCCL between GPUs without peer access "
            f"(NVLink / PCIe P2P) needs more and fails at its first large collective; start the container "
            f"with `docker run --shm-size 1g` (or set NCCL_SHM_DISABLE=1, slower)")
