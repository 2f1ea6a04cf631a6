"""What every peer runner shares: its command line, the workload, the measurements and the JSON it prints.

Standard library only: a runner runs with its peer's own venv python, which has no tgserve, and
imports this file from its own folder (a script's folder is first on `sys.path`). tgserve imports
it as `tgserve.benchmark.peers.peer_protocol` to read what the runners print.

A runner gives `measure` one function, `generate(prompts, num_new_tokens) -> seconds`, that runs
its engine greedily on a batch of token-id prompts (no tokenizer, EOS ignored) and returns the
wall time; `measure` turns it into the metrics below, the same way for every peer:
  - ttft_ms: one `sequence_length`-token prompt, 1 new token;
  - decode_ms_per_token: (time for `decode_length` tokens - time for 1 token) / (decode_length - 1), batch 1;
  - output_tokens_per_s[B]: B prompts at once, B * decode_length / wall time.
Each figure is the median of `runs` calls; every call gets fresh random prompts, so no prefix cache helps.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Callable

Generate = Callable[[list[list[int]], int], float]
RESULT_MARK = "TGSERVE_PEER_RESULT "  # the one stdout line the parent reads, whatever else the engine prints


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The command line every runner takes; the parent passes the same workload to each."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-dir", required=True, help="Hugging Face checkpoint folder (safetensors)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--sequence-length", type=int, default=128, help="prompt tokens (default: 128)")
    parser.add_argument("--decode-length", type=int, default=32, help="new tokens per sequence (default: 32)")
    parser.add_argument("--batch-sizes", default="8,16", help="batch sizes for output tokens/s (default: 8,16)")
    parser.add_argument("--runs", type=int, default=3, help="measured calls per figure; the median is kept")
    parser.add_argument("--warmups", type=int, default=1, help="unmeasured calls per batch size first")
    parser.add_argument("--threads", type=int, default=None, help="compute threads (default: the usable cores)")
    parser.add_argument("--seed", type=int, default=0, help="prompt token ids are drawn from this")
    parser.add_argument("--weight-bits", type=int, default=0, choices=(0, 4, 8),
                        help="tgserve ran quantized weights of this many bits: a peer that can runs its own "
                             "format of that width (llama.cpp Q8_0 / Q4_0); 0: float weights at --dtype")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if args.decode_length < 2:
        parser.error("--decode-length must be >= 2")
    return args


class Prompts:
    """Fresh random prompts on every call, the same sequence of them for every peer with the same seed."""

    def __init__(self, vocab_size: int, sequence_length: int, seed: int):
        self._rng = random.Random(seed)
        self._vocab_size = vocab_size
        self._length = sequence_length

    def batch(self, batch_size: int) -> list[list[int]]:
        return [[self._rng.randrange(self._vocab_size) for _ in range(self._length)] for _ in range(batch_size)]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def measure(generate: Generate, vocab_size: int, args: argparse.Namespace) -> dict:
    """The three metrics of the module docstring, from `generate` on this workload."""
    prompts = Prompts(vocab_size, args.sequence_length, args.seed)
    decode = args.decode_length
    for _ in range(args.warmups):
        for batch_size in [1, *args.batch_sizes]:
            generate(prompts.batch(batch_size), 2)
    one = [generate(prompts.batch(1), 1) for _ in range(args.runs)]
    full = [generate(prompts.batch(1), decode) for _ in range(args.runs)]
    throughput = {}
    for batch_size in args.batch_sizes:
        times = [generate(prompts.batch(batch_size), decode) for _ in range(args.runs)]
        throughput[str(batch_size)] = batch_size * decode / _median(times)
    return {"ttft_ms": _median(one) * 1000.0,
            "decode_ms_per_token": (_median(full) - _median(one)) / (decode - 1) * 1000.0,
            "output_tokens_per_s": throughput}


def emit(engine: str, version: str, metrics: dict, settings: dict, notes: list[str] | None = None) -> None:
    """Print the result line for an engine that ran."""
    _print({"engine": engine, "version": version, "is_available": True, "metrics": metrics,
            "settings": settings, "notes": notes or []})


def emit_unavailable(engine: str, reason: str) -> None:
    """Print the result line for an engine that cannot run here, saying exactly why."""
    _print({"engine": engine, "is_available": False, "reason": reason})


def _print(result: dict) -> None:
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict | None:
    """The last result line of a runner's stdout, or None when it printed none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return None
