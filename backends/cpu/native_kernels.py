"""Builds the cpu backend's native libraries at first use and loads their ops: native/weight_only_gemm.cpp as
torch.ops.tgserve_cpu (the default), native/paged_attention.cpp as torch.ops.tgserve_cpu_attention (ATTENTION),
native/fused_elementwise.cpp as torch.ops.tgserve_cpu_fused (FUSED),
native/bf16_gemm.cpp as torch.ops.tgserve_cpu_bf16 (BF16_GEMM).

The build (torch.utils.cpp_extension with ninja, ~15 s of one core) happens once per machine: the
library is cached under <cache_root>/<key>/, the key hashing the source, torch's version, the compiler
flags and this CPU's model and flags, so a cache copied to (or shared with) another CPU kind is never
loaded there: an -march=native binary would crash on a CPU without its instructions. Two processes
starting at once (tests run servers in parallel) serialize on an flock of <key>/build.lock, which the
kernel drops if its holder dies; the second finds the library built and only loads it.
Every failure (no compiler, no ninja, a compile error, a library that does not load) is a
NativeBuildError; the caller falls back to torch's ops and logs why.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tgserve.backends.cpu import host

SOURCE = Path(__file__).with_name("native") / "weight_only_gemm.cpp"
LIBRARY_NAME = "tgserve_weight_only"
OPS_NAMESPACE = "tgserve_cpu"  # TORCH_LIBRARY(tgserve_cpu, ...) in the source
# -march: the host's own ISA, or the portable AVX2 path (TGSERVE_CPU_ISA=avx2) CI uses on any CPU.
MARCH = {"native": "native", "avx2": "haswell"}
# fp-contract: C++20 mode would turn FMA contraction off. -fopenmp: at::parallel_for is an inline template
# that runs serially unless compiled with OpenMP; linked so, the library shares torch's libgomp (the
# soname torch already loaded), so it runs on torch's own pool and thread count.
CFLAGS = ("-O3", "-ffp-contract=fast", "-Wno-psabi", "-fopenmp")
LDFLAGS = ("-fopenmp",)


@dataclass(frozen=True, slots=True)
class NativeLibrary:
    """One native library: its single source file, the name it is built and cached under, and the
    namespace its TORCH_LIBRARY block registers (each its own, so one failing to build leaves the others)."""

    name: str
    source: Path
    ops_namespace: str


ATTENTION = NativeLibrary("tgserve_paged_attention", Path(__file__).with_name("native") / "paged_attention.cpp",
                          "tgserve_cpu_attention")
FUSED = NativeLibrary("tgserve_fused_elementwise", Path(__file__).with_name("native") / "fused_elementwise.cpp",
                      "tgserve_cpu_fused")
BF16_GEMM = NativeLibrary("tgserve_bf16_gemm", Path(__file__).with_name("native") / "bf16_gemm.cpp", "tgserve_cpu_bf16")


# ops namespace -> (source, build folder) this process loaded it from. A process keeps the first build of
# a source it loads: a second (another ISA, another cache root) would register the namespace again, which
# torch answers by aborting the process. Only tests switch ISA within one process.
_LOADED: dict[str, tuple[Path, Path]] = {}


class NativeBuildError(RuntimeError):
    """The native kernels could not be built or loaded here; the message says why, in one line."""


def weight_only_library() -> NativeLibrary:
    """The weight-only GEMM's library, read from the module's names when asked (tests point them elsewhere)."""
    return NativeLibrary(LIBRARY_NAME, SOURCE, OPS_NAMESPACE)


def cache_key(isa: str, source: Path | None = None) -> str:
    """Hex digest naming one build: source, the headers beside it, torch, flags, and the CPU (model and
    instruction flags)."""
    source = source or SOURCE
    headers = b"".join(header.read_bytes() for header in sorted(source.parent.glob("*.h")))  # shared by sources
    parts = (source.read_bytes(), headers, torch.__version__.encode(), repr((MARCH[isa], CFLAGS, LDFLAGS)).encode(),
             host.cpu_model_name().encode(), " ".join(sorted(host.cpu_flags())).encode())
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part + b"\0")
    return digest.hexdigest()[:16]


def load_ops(cache_root: Path, isa: str = "native", library: NativeLibrary | None = None):
    """torch.ops.<namespace> of `library` (default: the weight-only GEMM's) built for `isa` ("native" |
    "avx2"); builds it if needed. Returns (ops, build folder, build seconds: ~0 when cached).

    Called once per process and library at engine load (never per step); raises NativeBuildError."""
    library = library or weight_only_library()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise NativeBuildError(f"no C++ compiler ({compiler!r} not found)")
    _put_ninja_on_path()
    loaded = _LOADED.get(library.ops_namespace)
    if loaded is not None and loaded[0] == library.source:  # torch aborts on a second registration
        return getattr(torch.ops, library.ops_namespace), loaded[1], 0.0
    build_dir = cache_root / cache_key(isa, library.source)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(build_dir / "build.lock"):
            stale_baton = build_dir / "lock"  # cpp_extension's own lock, left behind by a killed build
            stale_baton.unlink(missing_ok=True)
            from torch.utils.cpp_extension import load

            start = time.monotonic()
            load(library.name, [str(library.source)], extra_cflags=[f"-march={MARCH[isa]}", *CFLAGS],
                 extra_ldflags=list(LDFLAGS),
                 build_directory=str(build_dir), is_python_module=False, verbose=False)
            build_s = time.monotonic() - start
    except NativeBuildError:
        raise
    except (OSError, RuntimeError, ImportError, SystemExit) as error:  # cpp_extension raises these
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise NativeBuildError(f"build in {build_dir} failed: {reason}") from error
    _LOADED[library.ops_namespace] = (library.source, build_dir)
    ops = getattr(torch.ops, library.ops_namespace)
    return ops, build_dir, build_s


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the `ninja` wheel (a dependency) installs it beside the
    venv's python, which is on PATH only in an activated venv, so add that folder (or the wheel's)."""
    if shutil.which("ninja"):
        return
    folders = [str(Path(sys.executable).parent)]
    try:
        import ninja  # the wheel; its BIN_DIR holds the binary

        folders.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    found = next((folder for folder in folders if shutil.which("ninja", path=folder)), None)
    if found is None:
        raise NativeBuildError("ninja not found (pip install ninja)")
    os.environ["PATH"] = found + os.pathsep + os.environ.get("PATH", "")


class _exclusive:
    """An flock held for the `with` block: released by the kernel even if this process dies."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        import fcntl

        self.file = open(self.path, "a+")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
