"""`tgserve benchmark shards`: argument parsing and the handler (see `tgserve.benchmark.shards`).

`add_shards_parser(benchmark_commands)` is called by `benchmark/cli.py`'s `add_benchmark_parser`.
"""
from __future__ import annotations

import argparse
import shlex
import tempfile

from tgserve.benchmark.speculation_cli import _counts
from tgserve.benchmark.startup_cli import SHAPES


def add_shards_parser(benchmark_commands: argparse._SubParsersAction) -> None:
    """Add `shards` to the `tgserve benchmark` subcommands."""
    shards = benchmark_commands.add_parser(
        "shards", help="tensor parallelism: per decode step compute vs communication, tokens/s, RSS per rank")
    model = shards.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-id", default=None, help="checkpoint to serve")
    model.add_argument("--shape", choices=SHAPES, default=None,
                       help="serve random weights of this released model's shape, written to a temporary folder first")
    shards.add_argument("--num-shard", type=_counts, default=(1, 2), help="comma-separated shard counts (default: 1,2)")
    shards.add_argument("--batch-size", type=_counts, default=(1,),
                        help="comma-separated concurrent requests per round (default: 1)")
    shards.add_argument("--max-new-tokens", type=int, default=64, help="per request (default: 64)")
    shards.add_argument("--rounds", type=int, default=3, help="measured rounds per batch size (default: 3)")
    shards.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="default: the backend's")
    shards.add_argument("--serve-args", default="",
                        help="more `tgserve serve` flags as one string: --serve-args='--quantize eetq'")
    shards.add_argument("--timeout-s", type=float, default=900.0, help="per server start, until healthy (default: 900)")
    shards.add_argument("--log-dir", default=None, help="keep the servers' logs here (default: a temporary folder)")
    shards.add_argument("--result-file", default=None, help="write the results as JSON here")
    shards.set_defaults(handler=run_shards_command)


def run_shards_command(args: argparse.Namespace) -> int:
    """Handler of `tgserve benchmark shards`; exit code 1 when a server failed."""
    from tgserve.benchmark.engine_cli import _error, _report
    from tgserve.benchmark.shards import (ShardsConfig, format_shards_report, machine_meta, run_shards_bench,
                                          shards_report)

    def config(model_id: str) -> ShardsConfig:
        return ShardsConfig(model_id=model_id, num_shards=args.num_shard, batch_sizes=args.batch_size,
                            max_new_tokens=args.max_new_tokens, rounds=args.rounds, dtype=args.dtype,
                            serve_args=tuple(shlex.split(args.serve_args)), timeout_s=args.timeout_s,
                            log_dir=args.log_dir or tempfile.mkdtemp(prefix="tgserve-shards-"))
    try:
        config(args.model_id or "")  # bad flags fail before a checkpoint is written
        with tempfile.TemporaryDirectory(prefix="tgserve-shards-model-") as scratch:
            model_id = args.model_id
            if args.shape:
                from tgserve.checkpoints.demo_model import write_demo_model
                model_id = str(write_demo_model(scratch, args.shape, seed=0, progress=False))
            bench_config = config(model_id)
            meta = machine_meta()
            rows = run_shards_bench(bench_config)
    except (ValueError, OSError) as error:
        return _error(error)
    report = shards_report(meta, bench_config, rows)
    _report(format_shards_report(report), report, args.result_file)
    return 1 if any(row.error for row in rows) else 0
