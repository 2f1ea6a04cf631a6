"""`tgserve benchmark ...`: the benchmark subcommands, declared here and mounted by `tgserve.api.cli`.

`add_benchmark_parser(commands)` adds the `benchmark` command and its sub-subcommands; each one is
an `add_*_parser(benchmark_commands)` function below that sets `handler`. Heavy imports (httpx,
transformers, matplotlib) happen in the handlers, never at import time.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

from tgserve.benchmark.engine_cli import add_engine_parsers
from tgserve.benchmark.grammar_cli import add_grammar_parser
from tgserve.benchmark.layers_cli import add_layers_parser
from tgserve.benchmark.quality_cli import add_quality_parser
from tgserve.benchmark.shards_cli import add_shards_parser
from tgserve.benchmark.speculation_cli import add_speculation_parser
from tgserve.benchmark.startup_cli import add_startup_parser

SERVE_BACKENDS = ("tgi", "openai-completions", "openai-chat")  # keys of serve_backends.BACKENDS


def add_benchmark_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `benchmark` with its subcommands to the `tgserve` subparsers; return the `benchmark` parser."""
    benchmark = commands.add_parser("benchmark", help="measure a server or the engine")
    benchmark_commands = benchmark.add_subparsers(dest="benchmark_command", metavar="BENCHMARK", required=True)
    add_serve_parser(benchmark_commands)
    add_engine_parsers(benchmark_commands)  # engine, compare, peers setup (engine_cli.py)
    add_startup_parser(benchmark_commands)  # startup (startup_cli.py)
    add_gpu_check_parser(benchmark_commands)
    add_quality_parser(benchmark_commands)  # quality (quality_cli.py)
    add_layers_parser(benchmark_commands)  # layers (layers_cli.py)
    add_speculation_parser(benchmark_commands)  # speculation (speculation_cli.py)
    add_shards_parser(benchmark_commands)  # shards (shards_cli.py)
    add_grammar_parser(benchmark_commands)  # grammar (grammar_cli.py)
    return benchmark


def add_serve_parser(benchmark_commands: argparse._SubParsersAction) -> None:
    """`benchmark serve`: load a running TGI- or OpenAI-route server (vLLM's benchmark_serving)."""
    serve = benchmark_commands.add_parser("serve", help="load a running server at request rates; latency, throughput")
    target = serve.add_argument_group("server")
    target.add_argument("--backend", choices=SERVE_BACKENDS, default="tgi", help="route family (default: tgi)")
    target.add_argument("--base-url", default="http://127.0.0.1:3000", help="default: http://127.0.0.1:3000")
    target.add_argument("--model", default=None, help="model name for OpenAI routes (default: the first of /v1/models)")
    data = serve.add_argument_group("dataset")
    data.add_argument("--dataset", choices=("random", "sharegpt", "multiturn"), default="random",
                      help="default: random; multiturn: --num-prompts conversations of --num-turns turns, each "
                           "turn's prompt the conversation so far, all opening with one --prefix-len system text")
    data.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (with --dataset sharegpt)")
    data.add_argument("--tokenizer", default=None,
                      help="Hugging Face tokenizer folder (the served checkpoint) for exact prompt token counts")
    data.add_argument("--num-prompts", type=int, default=100, help="default: 100")
    data.add_argument("--input-len", type=int, default=128, help="random: mean prompt tokens (default: 128)")
    data.add_argument("--output-len", type=int, default=64, help="random: mean output tokens (default: 64)")
    data.add_argument("--range-ratio", type=float, default=0.0,
                      help="random: lengths vary uniformly by +-this fraction of the mean (default: 0.0)")
    data.add_argument("--prefix-len", type=int, default=0,
                      help="random: tokens of a prefix shared by all prompts; multiturn: of the system text")
    data.add_argument("--num-turns", type=int, default=6, help="multiturn: turns per conversation (default: 6)")
    data.add_argument("--sharegpt-output-len", type=int, default=None,
                      help="sharegpt: ask for this many output tokens instead of the reply's length")
    load = serve.add_argument_group("load")
    load.add_argument("--request-rate", default="inf",
                      help="requests/s, or a comma-separated sweep such as 1,2,4,inf (default: inf, all at once)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of inter-arrival times: 1 Poisson, <1 burstier (default: 1.0)")
    load.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    load.add_argument("--force-output-len", action="store_true",
                      help="make servers generate exactly the requested tokens (ignore_eos where supported)")
    load.add_argument("--seed", type=int, default=0, help="dataset and arrival seed (default: 0)")
    report = serve.add_argument_group("report")
    report.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                        help="SLOs for goodput, e.g. ttft:500 tpot:50 (NAME: ttft, tpot, e2el)")
    report.add_argument("--result-file", default=None, help="write the results as JSON here")
    report.add_argument("--plot-file", default=None, help="write latency vs throughput over the rates as PNG here")
    report.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    serve.set_defaults(handler=run_serve_command)


def add_gpu_check_parser(benchmark_commands: argparse._SubParsersAction) -> None:
    """`benchmark gpu-check`: parity with transformers and the engine benchmark on a lent GPU (gpu_check.py)."""
    check = benchmark_commands.add_parser(
        "gpu-check", help="on a GPU machine: backends, parity with transformers, the Qwen2-7B engine benchmark; JSON")
    check.add_argument("--backend", default="cuda", help="the backend every step forces (default: cuda)")
    check.add_argument("--small", action="store_true",
                       help="toy sizes, for a CPU run that proves the check works (with --backend cpu)")
    check.add_argument("--out", default="bench-results/gpu-check",
                       help="results folder (default: bench-results/gpu-check)")
    check.add_argument("--work-dir", default=None,
                       help="where steps write checkpoints, 15 GB for Qwen2-7B (default: TMPDIR/tgserve-gpu-check)")
    check.add_argument("--budget-s", type=float, default=420.0,
                       help="all steps together (default: 420, so install + check stay under 8 minutes)")
    check.add_argument("--demo-model", default=None, help="a built demo checkpoint (default: the cached one)")
    check.add_argument("--smollm2-dir", default=None,
                       help="a built SmolLM2 checkpoint (default: `tgserve demo-model --real smollm2-135m` builds it)")
    check.add_argument("--steps", default=None, help="comma-separated subset of the steps (default: all)")
    check.set_defaults(handler=run_gpu_check_command)


def run_gpu_check_command(args: argparse.Namespace) -> int:
    """Handler of `tgserve benchmark gpu-check`: 0 when no step failed."""
    import tempfile
    from pathlib import Path

    from tgserve.benchmark.gpu_check import GpuCheckConfig, format_summary, run_check

    try:
        config = GpuCheckConfig(
            backend=args.backend, is_small=args.small, out_dir=str(Path(args.out).resolve()),
            work_dir=str(Path(args.work_dir or Path(tempfile.gettempdir()) / "tgserve-gpu-check").resolve()),
            budget_s=args.budget_s, demo_model_dir=_absolute(args.demo_model),
            smollm2_dir=_absolute(args.smollm2_dir),
            **({"steps": tuple(s.strip() for s in args.steps.split(",") if s.strip())} if args.steps else {}))
        summary = run_check(config)
    except (ValueError, OSError) as error:
        return _error(error)
    print(format_summary(summary), flush=True)
    return 0 if summary["passed"] else 1


def _absolute(path: str | None) -> str | None:
    from pathlib import Path

    return str(Path(path).resolve()) if path else None


def _error(message: object) -> int:
    print(f"tgserve benchmark: error: {message}", file=sys.stderr, flush=True)
    return 1


def _missing_modules(args: argparse.Namespace) -> list[str]:
    needed = ["httpx"] + (["matplotlib"] if args.plot_file else []) + (["transformers"] if args.tokenizer else [])
    return [name for name in needed if importlib.util.find_spec(name) is None]


def run_serve_command(args: argparse.Namespace) -> int:
    """Handler of `tgserve benchmark serve`: build the dataset, run every rate, report; the exit code."""
    missing = _missing_modules(args)
    if missing:
        return _error(f"the serving benchmark needs {', '.join(missing)}: pip install 'tgserve[bench]'")
    from tgserve.benchmark.serve_main import run_serve

    try:
        return run_serve(args)
    except (ValueError, RuntimeError, OSError) as error:
        return _error(error)

