"""The peer engines tgserve is compared with, and how one is run: its runner, with its python, as a child process.

A peer that is not set up, fails, or says it cannot run here comes back as
`{"engine", "is_available": False, "reason"}`, never as an exception: the comparison table still
prints, with the reason under it.
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tgserve.benchmark.peers.peer_protocol import parse_result

RUNNERS_DIR = Path(__file__).resolve().parent
STDERR_TAIL_CHARS = 1500  # of a failed runner's stderr, kept in the reason


@dataclass(slots=True, frozen=True)
class PeerSpec:
    name: str  # as given to --peers
    title: str  # column header
    runner: str  # script beside this module
    needs_venv: bool  # False: runs with tgserve's own python (its dependencies suffice)
    is_cpu_only: bool  # meaningful only where tgserve runs on the CPU
    runs_quantized: bool = False  # honours --weight-bits (else it runs float weights beside quantized tgserve)


PEERS = {
    "transformers": PeerSpec("transformers", "transformers", "transformers_runner.py", False, False),
    "llamacpp": PeerSpec("llamacpp", "llama.cpp", "llamacpp_runner.py", True, True, runs_quantized=True),
    "vllm": PeerSpec("vllm", "vLLM-CPU", "vllm_runner.py", True, True),
}


def parse_peer_names(text: str) -> list[str]:
    """`transformers,llamacpp` -> ['transformers', 'llamacpp']; raises ValueError on an unknown name."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEERS)}")
    return names


def peer_python(spec: PeerSpec, venvs_dir: Path) -> Path | None:
    """The python that runs `spec`'s runner, or None when its venv has not been set up."""
    if not spec.needs_venv:
        return Path(sys.executable)
    python = Path(venvs_dir) / spec.name / "bin" / "python"
    return python if python.exists() else None


def unavailable(spec: PeerSpec, reason: str) -> dict:
    return {"engine": spec.title, "is_available": False, "reason": reason}


def runner_args(model_dir: Path, dtype: str, sequence_length: int, decode_length: int, batch_sizes: list[int],
                runs: int, warmups: int, threads: int | None, seed: int, weight_bits: int = 0) -> list[str]:
    """The workload as runner arguments, identical for every peer; `weight_bits` 8 / 4 when tgserve ran
    quantized weights (0: float)."""
    args = ["--model-dir", str(model_dir), "--dtype", dtype, "--sequence-length", str(sequence_length),
            "--decode-length", str(decode_length), "--batch-sizes", ",".join(map(str, batch_sizes)),
            "--runs", str(runs), "--warmups", str(warmups), "--seed", str(seed), "--weight-bits", str(weight_bits)]
    return args + (["--threads", str(threads)] if threads else [])


def run_peer(spec: PeerSpec, venvs_dir: Path, args: list[str], timeout_s: float) -> dict:
    """Run one peer's runner to completion; its result dict (with `wall_s`) or an unavailable one."""
    python = peer_python(spec, venvs_dir)
    if python is None:
        return unavailable(spec, f"not set up: run `tgserve benchmark peers setup --dir {venvs_dir} --peers {spec.name}`")
    cmd = [str(python), str(RUNNERS_DIR / spec.runner), *args]
    print(f"running {spec.title}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    start_s = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return unavailable(spec, f"runner did not finish within {timeout_s:.0f} s")
    result = parse_result(proc.stdout)
    if result is None:
        tail = proc.stderr[-STDERR_TAIL_CHARS:].strip()
        return unavailable(spec, f"runner exited with {proc.returncode} and no result; stderr ends: {tail}")
    result["engine"] = spec.title
    result["wall_s"] = time.monotonic() - start_s
    return result
