"""`tgserve benchmark speculation`: argument parsing, handler and table (speculation_bench.py does the work).

`add_speculation_parser(benchmark_commands)` is called by `benchmark/cli.py`'s `add_benchmark_parser`.
Only argparse at import time; torch, the engine and transformers load in the handler.
"""
from __future__ import annotations

import argparse

WORKLOADS = "input-grounded,open-ended"  # speculation_workloads.WORKLOADS, without importing it
LENGTHS = "adaptive,fixed"


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got '{text}'")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_speculation_parser(benchmark_commands: argparse._SubParsersAction) -> None:
    """Add `speculation` to the `tgserve benchmark` subcommands."""
    spec = benchmark_commands.add_parser(
        "speculation", help="tokens/s and mean accepted length of --speculate N, beside transformers' prompt "
                            "lookup and assisted generation")
    spec.add_argument("--model-id", default=None,
                      help="checkpoint folder or hub id; a checkpoint with Medusa heads runs them "
                           "(default: SmolLM2-135M-Instruct, as `tgserve serve`)")
    spec.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                      help="default: the backend's default")
    spec.add_argument("--backend", default="auto", help="backend plugin (default: auto)")
    spec.add_argument("--speculate", type=_counts, default=(0, 2, 4), help="comma-separated N (default: 0,2,4)")
    spec.add_argument("--batch-size", type=_counts, default=(1, 16),
                      help="comma-separated requests in flight (default: 1,16)")
    spec.add_argument("--workloads", type=_names, default=_names(WORKLOADS), help=f"default: {WORKLOADS}")
    spec.add_argument("--lengths", type=_names, default=_names(LENGTHS),
                      help=f"proposal lengths: adaptive (what --speculate runs), fixed (always N; n-gram) "
                           f"(default: {LENGTHS})")
    spec.add_argument("--max-new-tokens", type=int, default=128, help="per request (default: 128)")
    spec.add_argument("--max-prompts", type=int, default=None,
                      help="only the first N prompts of each workload (default: all)")
    spec.add_argument("--runs", type=int, default=1, help="measured runs per cell, the median kept (default: 1)")
    spec.add_argument("--ignore-eos", action="store_true",
                      help="always generate --max-new-tokens (transformers: min_new_tokens, which masks EOS)")
    spec.add_argument("--no-transformers", action="store_true", help="skip transformers' generate")
    spec.add_argument("--assistant-model", default=None,
                      help="draft checkpoint folder for transformers' assisted generation (same tokenizer)")
    spec.add_argument("--speculative-model", default=None,
                      help="draft checkpoint folder for tgserve's --speculative-model, where this build has it")
    spec.add_argument("--knee-rows", type=float, default=None,
                      help="the adaptive rule's rows at which a step costs twice a one-row step "
                           "(default: what start-up measured; the table's header shows it)")
    spec.add_argument("--result-file", default=None, help="write the results as JSON here")
    spec.set_defaults(handler=run_speculation_command)


def format_speculation_report(report: dict) -> str:
    """The results as one table, a header line naming the run, and the notes."""
    from tgserve.benchmark.engine_report import _table

    meta = report["meta"]
    header = ["workload", "engine", "method", "lengths", "N", "batch", "tokens", "tokens/s", "x N=0",
              "accepted/step", "rows/token", "knee", "same ids"]
    rows = []
    for r in report["results"]:
        rows.append([r["workload"], r["engine"], r["method"], r["lengths"], r["speculate"], r["batch_size"],
                     r["output_tokens"], f"{r['tokens_per_s']:.1f}",
                     "-" if r.get("speedup") is None else f"{r['speedup']:.2f}",
                     f"{r['mean_accepted_length']:.2f}",
                     "-" if r["decode_rows_per_token"] is None else f"{r['decode_rows_per_token']:.2f}",
                     "-" if r.get("knee_rows") is None else f"{r['knee_rows']:.1f}",
                     {True: "yes", False: "no", None: "-"}[r["same_ids_as_speculate_0"]]])
    knee = meta.get("knee_rows")
    lines = [f"{meta['model_id']} ({meta['dtype']}, {meta['backend']}, {meta['cpu_model']}, "
             f"{meta['torch_threads']} threads){'' if knee is None else f', start knee {knee:.1f} rows'}",
             _table(header, rows)]
    return "\n".join(lines + [f"note: {note}" for note in report["notes"]])


def run_speculation_command(args: argparse.Namespace) -> int:
    """Handler of `tgserve benchmark speculation`."""
    from tgserve.benchmark.engine_cli import _error, _report, _run_errors
    from tgserve.benchmark.speculation_bench import SpeculationBenchConfig, run_speculation_bench

    try:
        config = SpeculationBenchConfig(
            model_id=args.model_id, dtype=args.dtype, backend=args.backend, speculates=args.speculate,
            batch_sizes=args.batch_size, workloads=args.workloads, lengths=args.lengths,
            max_new_tokens=args.max_new_tokens, max_prompts=args.max_prompts, runs=args.runs,
            is_eos_ignored=args.ignore_eos,
            is_transformers_run=not args.no_transformers, assistant_model=args.assistant_model,
            speculative_model=args.speculative_model, knee_rows=args.knee_rows)
        report = run_speculation_bench(config)
    except (*_run_errors(), RuntimeError) as error:
        return _error(error)
    return _report(format_speculation_report(report), report, args.result_file)
