#!/usr/bin/env bash
# Install tgserve with its test dependencies, then run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
# A CPU build of torch first: a bare `pip install torch` would pull several GB of CUDA packages.
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev]"
# The official TGI client pins huggingface-hub<1.0, which breaks transformers 5: install it bare.
python3 -m pip install -q --no-deps "text-generation>=0.7"
python3 -m pytest -q "$@"
