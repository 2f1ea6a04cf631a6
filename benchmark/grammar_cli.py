"""`tgserve benchmark grammar`: argument parsing, handler and tables (grammar_bench.py does the work).

`add_grammar_parser(benchmark_commands)` is called by `benchmark/cli.py`'s `add_benchmark_parser`.
Only argparse at import time; the grammar libraries, torch and transformers load in the workers.
"""
from __future__ import annotations

import argparse

ENGINES = "xgrammar,llguidance,outlines-core"  # grammar_engines.ENGINE_NAMES, without importing it
TOKENIZERS = "demo,smollm2,synthetic-151k"  # grammar_tokenizers.TOKENIZER_NAMES


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_grammar_parser(benchmark_commands: argparse._SubParsersAction) -> None:
    """Add `grammar` to the `tgserve benchmark` subcommands."""
    grammar = benchmark_commands.add_parser(
        "grammar", help="structured generation libraries: tokenizer build, compile time, rejections, "
                        "per-token mask time (1 and 16 rows)")
    grammar.add_argument("--engines", type=_names, default=_names(ENGINES), help=f"default: {ENGINES}")
    grammar.add_argument("--tokenizers", type=_names, default=_names(TOKENIZERS), help=f"default: {TOKENIZERS}")
    grammar.add_argument("--cases", type=_names, default=(),
                         help="comma-separated grammar case names (default: all; the table lists them)")
    grammar.add_argument("--compile-timeout-s", type=float, default=20.0,
                         help="per compile; the worker is killed past it (default: 20)")
    grammar.add_argument("--walks", type=int, default=5, help="walks of each answer for per-step time (default: 5)")
    grammar.add_argument("--threads", type=int, default=2, help="threads per library (default: 2)")
    grammar.add_argument("--result-file", default=None, help="write the results as JSON here")
    grammar.set_defaults(handler=run_grammar_command)


def _ms(entry: dict) -> str:
    if entry["status"] == "ok":
        return f"{entry['compile_ms']:.1f}"
    if entry["status"] == "rejected":
        return f"rejected ({entry['compile_ms']:.1f})"
    return entry["status"]


def _us(summary: dict | None, key: str) -> str:
    return "-" if summary is None else f"{summary[key]:.0f}"


def format_grammar_report(report: dict) -> str:
    """Tokenizer build, compile ms per case and tokenizer, per-step mask microseconds, and the rejections."""
    from tgserve.benchmark.engine_report import _table

    meta, results = report["meta"], report["results"]
    versions = ", ".join(f"{name} {version}" for name, version in meta["versions"].items())
    lines = [f"{versions}; {meta['cpu_model']}, {meta['cpus']} cpus, {meta['num_threads']} threads per library; "
             f"{meta['started_utc']}-{meta['finished_utc'][11:]} UTC, load average "
             f"{meta['load_avg_before'][0]:.2f} -> {meta['load_avg_after'][0]:.2f}",
             "", "tokenizer data build (s, once per server)"]
    tokenizers = list(dict.fromkeys(r["tokenizer"] for r in results))
    engines = list(dict.fromkeys(r["engine"] for r in results))
    by_pair = {(r["engine"], r["tokenizer"]): r for r in results}
    lines.append(_table(["library"] + [f"{t} ({by_pair[(engines[0], t)]['num_tokens']})" for t in tokenizers],
                        [[e] + [f"{by_pair[(e, t)]['tokenizer_build_s']:.2f}" for t in tokenizers] for e in engines]))
    for tokenizer in tokenizers:
        lines += ["", f"compile ms, cold ({tokenizer}); rejected = the library refused it"]
        rows = [[case["name"], case["expect"]] + [_ms(by_pair[(e, tokenizer)]["compiles"][case["name"]]) for e in engines]
                for case in report["cases"]]
        lines.append(_table(["case", "expected"] + engines, rows))
    lines += ["", "per-step mask time, microseconds (fill: one bitmask for the step; accept: advance by the token)"]
    rows = []
    for r in results:
        walk, batch = r["walk"] or {}, r["batch"]
        rows.append([r["tokenizer"], r["engine"], _us(walk.get("new_matcher_us"), "median"),
                     _us(walk.get("first_fill_us"), "median"), _us(walk.get("fill_us"), "median"),
                     _us(walk.get("fill_us"), "p99"), _us(walk.get("accept_us"), "median"),
                     _us(batch and batch["fill_us"], "median"), _us(batch and batch["fill_us"], "p99"),
                     _us(batch and batch["loop_fill_us"], "median"),
                     f"{walk.get('num_failures', 0) + (batch['num_failures'] if batch else 0)}",
                     "-" if not r["gil"] else f"{r['gil']['main_thread_rate']:.2f}"])
    lines.append(_table(["tokenizer", "library", "new matcher", "first fill", "fill 1 row", "p99", "accept",
                         "fill 16 rows", "p99", "16 one by one", "mask errors", "GIL free"], rows))
    lines += ["", "rejections and limits (first tokenizer)"]
    rows = []
    for case in report["cases"]:
        for e in engines:
            entry = by_pair[(e, tokenizers[0])]["compiles"][case["name"]]
            if entry["status"] != "ok":
                rows.append([case["name"], e, entry["status"], (entry["error"] or "")[:90].replace("\n", " ")])
    lines.append(_table(["case", "library", "outcome", "message"], rows) if rows else "(none)")
    lines += ["", "note: GIL free = main-thread Python speed while the slowest valid case compiles in a thread "
                  "(1 = the compile releases the GIL; 0 = it holds it). Wall-clock numbers on a shared machine."]
    return "\n".join(lines)


def run_grammar_command(args: argparse.Namespace) -> int:
    """Handler of `tgserve benchmark grammar`."""
    from tgserve.benchmark.engine_cli import _error, _report
    from tgserve.benchmark.grammar_bench import GrammarBenchConfig, run_grammar_bench

    try:
        config = GrammarBenchConfig(engines=args.engines, tokenizers=args.tokenizers, cases=args.cases,
                                    compile_timeout_s=args.compile_timeout_s, walks=args.walks,
                                    num_threads=args.threads)
        report = run_grammar_bench(config)
    except (ValueError, OSError) as error:
        return _error(error)
    return _report(format_grammar_report(report), report, args.result_file)
