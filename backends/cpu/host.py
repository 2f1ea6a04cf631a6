"""What the host offers the cpu backend: usable cores, bf16 instructions, available memory.

Linux answers come from /proc and /sys; every function has a portable fallback so the backend
still starts (more conservatively) elsewhere. Nothing here raises.
"""
from __future__ import annotations

import os
from pathlib import Path

# Best first: the name shown in the device name is the first one the CPU has.
_ISA_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "bf16", "asimd")
_NATIVE_BF16_FLAGS = {"amx_bf16", "avx512_bf16", "bf16"}  # "bf16": Arm's FEAT_BF16 (Features line)


def cpu_flags() -> set[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (x86 `flags`, Arm `Features`)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (x86 `model name`), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def best_isa(flags: set[str]) -> str:
    """The most capable matmul instruction set among `flags`, e.g. "avx512_bf16"; "" if unknown."""
    return next((flag for flag in _ISA_FLAGS if flag in flags), "")


def has_native_bf16(flags: set[str]) -> bool:
    """True when the CPU computes bf16 dot products in hardware (not by widening to fp32)."""
    return bool(flags & _NATIVE_BF16_FLAGS)


def usable_cpus() -> set[int]:
    """Logical CPU ids this process may run on (its affinity mask, which taskset/cgroups narrow)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def num_physical_cores(cpus: set[int], sysfs_cpu_dir: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores behind the logical `cpus`: SMT siblings count once.

    GEMM threads pinned to two hyper-threads of one core fight over the same FMA units, so
    torch runs fastest with one thread per physical core. Falls back to len(cpus) without sysfs.
    """
    cores = set()
    for cpu in cpus:
        topology = sysfs_cpu_dir / f"cpu{cpu}" / "topology"
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def available_memory_bytes() -> int:
    """Memory this process could allocate without swapping: MemAvailable, capped by a cgroup limit.

    In a container /proc/meminfo shows the host, so the cgroup v2 (memory.max - memory.current)
    or v1 (limit_in_bytes - usage_in_bytes) headroom is taken when it is smaller.
    """
    available = _meminfo_available_bytes()
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None:
            available = min(available, max(0, limit - usage))
    return available


def _meminfo_available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def _read_int(path: str) -> int | None:
    """An integer file such as memory.max; None when absent or "max" (no limit)."""
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
