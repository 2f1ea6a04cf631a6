"""`tgserve benchmark layers`: the flags of benchmark/quantized_layers.py, kept free of torch imports so
the CLI starts fast; the handler imports the benchmark itself."""
from __future__ import annotations

import argparse


def add_layer_arguments(parser: argparse.ArgumentParser) -> None:
    """The per-layer benchmark's flags (also its own `python -m tgserve.benchmark.quantized_layers`)."""
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated rows per call (default: 1,8)")
    parser.add_argument("--runs", type=int, default=20, help="timed calls per method per round (default: 20)")
    parser.add_argument("--warmups", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --runs calls per method")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--result-file", default=None, help="write the rows and the machine as JSON here")


def add_layers_parser(benchmark_commands: argparse._SubParsersAction) -> None:
    """Add `layers` to the `tgserve benchmark` subcommands."""
    layers = benchmark_commands.add_parser(
        "layers", help="per-layer speed of the cpu backend's weight-only kernels beside its dense linear")
    add_layer_arguments(layers)
    layers.set_defaults(handler=run_layers_command)


def run_layers_command(args: argparse.Namespace) -> int:
    from tgserve.benchmark import quantized_layers

    return quantized_layers.run(args)
