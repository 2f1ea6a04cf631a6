"""`tgserve benchmark quality`: argument parsing and handler (quality.py does the work).

`add_quality_parser(benchmark_commands)` is called by `benchmark/cli.py`'s `add_benchmark_parser`.
Only argparse at import time; torch and the engine load in the handler.
"""
from __future__ import annotations

import argparse

DEFAULT_METHODS = "none,eetq,fp8,gptq,awq,bitsandbytes-nf4"  # quality.DEFAULT_METHODS, without importing torch


def _checkpoint(text: str) -> tuple[str, str]:
    method, sep, path = text.partition("=")
    if not sep or not method.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected METHOD=DIR, got '{text}'")
    return method.strip(), path.strip()


def add_quality_parser(benchmark_commands: argparse._SubParsersAction) -> None:
    """Add `quality` to the `tgserve benchmark` subcommands."""
    quality = benchmark_commands.add_parser(
        "quality", help="perplexity and top-1 agreement of quantized models against the unquantized one")
    quality.add_argument("--model-id", default=None,
                         help="float checkpoint folder or hub id (default: SmolLM2-135M-Instruct, as `tgserve serve`)")
    quality.add_argument("--methods", default=DEFAULT_METHODS,
                         help=f"comma-separated --quantize names, `none` for unquantized (default: {DEFAULT_METHODS})")
    quality.add_argument("--checkpoint", action="append", type=_checkpoint, default=[], metavar="METHOD=DIR",
                         help="a method's own pre-quantized checkpoint, e.g. gptq=out/gptq (repeatable); "
                              "gptq, awq and compressed-tensors are skipped without one")
    quality.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                         help="run dtype of every method, the reference included (default: bfloat16)")
    quality.add_argument("--backend", default="auto", help="backend plugin (default: auto)")
    quality.add_argument("--text", default=None,
                         help="UTF-8 text file to score (default: the held-out corpus tgserve ships)")
    quality.add_argument("--window", type=int, default=512, help="tokens per teacher-forced forward (default: 512)")
    quality.add_argument("--stride", type=int, default=None,
                         help="tokens between window starts, < window: each token is scored once, with at least "
                              "window - stride tokens of context past the first window (default: half the window)")
    quality.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    quality.add_argument("--result-file", default=None, help="write the results as JSON here")
    quality.set_defaults(handler=run_quality_command)


def run_quality_command(args: argparse.Namespace) -> int:
    """Handler of `tgserve benchmark quality`."""
    from tgserve.benchmark.engine_cli import _error, _report, _run_errors
    from tgserve.benchmark.quality import QualityConfig, format_quality_report, run_quality

    try:
        config = QualityConfig(
            model_id=args.model_id, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
            checkpoints=dict(args.checkpoint), dtype=args.dtype, backend=args.backend, text_path=args.text,
            window=args.window, stride=args.stride or max(1, args.window // 2), max_tokens=args.max_tokens)
        report = run_quality(config)
    except _run_errors() as error:
        return _error(error)
    return _report(format_quality_report(report), report, args.result_file)
