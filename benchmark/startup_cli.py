"""`tgserve benchmark startup`: argument parsing and the handler (see `tgserve.benchmark.startup`).

`add_startup_parser(benchmark_commands)` is called by `benchmark/cli.py`'s `add_benchmark_parser`.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile

SHAPES = ("qwen2-0.5b", "qwen2-1.5b", "qwen2-7b")  # tgserve.checkpoints.demo_model.SHAPES, without importing torch


def _cpu_list(text: str) -> tuple[int, ...]:
    """"0,1" or "0-3" or "0-1,4" -> CPU ids."""
    ids: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            low, _, high = part.partition("-")
            ids.extend(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CPU ids such as 0,1 or 0-3, got '{text}'") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected CPU ids such as 0,1 or 0-3, got '{text}'")
    return tuple(sorted(set(ids)))


def add_startup_parser(benchmark_commands: argparse._SubParsersAction) -> None:
    """Add `startup` to the `tgserve benchmark` subcommands."""
    startup = benchmark_commands.add_parser(
        "startup", help="seconds from `tgserve serve` to healthy, the warmup, the chosen prefill limit, RSS")
    model = startup.add_mutually_exclusive_group()
    model.add_argument("--model-id", default=None, help="checkpoint to serve (default: the server's default model)")
    model.add_argument("--shape", choices=SHAPES, default=None,
                       help="serve random weights of this released model's shape, written to a temporary folder first")
    startup.add_argument("--dtypes", default="float32,bfloat16",
                         help="comma-separated: float32, bfloat16, float16, default (no --dtype); "
                              "default: float32,bfloat16")
    startup.add_argument("--runs", type=int, default=1, help="starts per dtype (default: 1)")
    startup.add_argument("--cpus", type=_cpu_list, default=None,
                         help="pin the servers to these CPUs, e.g. 0,1 to stand for a 2-core machine "
                              "(default: the CPUs this process may use)")
    startup.add_argument("--serve-args", default="",
                         help="more `tgserve serve` flags as one string: --serve-args='--max-batch-prefill-tokens 4096'")
    startup.add_argument("--python", default=sys.executable,
                         help="interpreter whose tgserve to start, e.g. another checkout's venv (default: this one)")
    startup.add_argument("--timeout-s", type=float, default=600.0, help="per start, until healthy (default: 600)")
    startup.add_argument("--settle-s", type=float, default=3.0,
                         help="idle seconds after healthy before the settled RSS is read (default: 3)")
    startup.add_argument("--log-dir", default=None, help="keep the servers' logs here (default: a temporary folder)")
    startup.add_argument("--result-file", default=None, help="write the results as JSON here")
    startup.set_defaults(handler=run_startup_command)


def startup_config(args: argparse.Namespace, model_id: str | None):
    """The `StartupConfig` the arguments describe (ValueError for bad values)."""
    from tgserve.benchmark.startup import StartupConfig

    return StartupConfig(python=args.python, model_id=model_id,
                         dtypes=tuple(d.strip() for d in args.dtypes.split(",") if d.strip()),
                         serve_args=tuple(shlex.split(args.serve_args)), runs=args.runs, cpus=args.cpus,
                         timeout_s=args.timeout_s, settle_s=args.settle_s, log_dir=args.log_dir)


def run_startup_command(args: argparse.Namespace) -> int:
    """Handler of `tgserve benchmark startup`; exit code 1 when a start failed."""
    from tgserve.benchmark.engine_cli import _error, _report
    from tgserve.benchmark.startup import format_startup_report, run_startup_bench

    try:
        startup_config(args, args.model_id)  # bad flags fail before a checkpoint is written
        with tempfile.TemporaryDirectory(prefix="tgserve-startup-model-") as scratch:
            model_id = args.model_id
            if args.shape:
                from tgserve.checkpoints.demo_model import write_demo_model
                model_id = str(write_demo_model(scratch, args.shape, seed=0, progress=False))
            report = run_startup_bench(startup_config(args, model_id))
    except (ValueError, OSError) as error:
        return _error(error)
    _report(format_startup_report(report), report, args.result_file)
    return 1 if any(row["error"] for row in report["results"]) else 0
