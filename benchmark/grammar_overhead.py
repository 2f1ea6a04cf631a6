"""Per-token cost of constrained decoding in the engine: decode steps with grammars against the same
steps without, at batch 1 and 16 (the issue's targets: <= 10% and <= 5% more time per token).

    python -m tgserve.benchmark.grammar_overhead [--model-id DIR] [--result-file out.json]

The engine is built once (demo model by default) and stepped on this thread, never started. Each
round runs every workload at every batch size: B greedy requests of the same prompt, each to exactly
`--new-tokens` tokens (unconstrained ones ignore EOS; the grammars cannot complete sooner: the JSON
one needs more array items than that, the regexes allow any lowercase text: `regex` an unbounded repeat,
the common form, `regex-count` a counted one, llguidance's costly case: each count is a new lexer state,
so every step walks the whole vocabulary for its mask). Only decode steps
with all B requests in them count; a step's time is `StepStats.duration_s`, mask fill and matcher
advance included. Rounds rotate the workloads' order so slow spells of a shared machine hit all of them; `us/row` is the
median step's extra time per constrained row over the unconstrained median.

Compile times come first: every valid case of `tgserve benchmark grammar`'s set, compiled through the
engine's own `GrammarCompiler` (thread pool and time limit included), cold and then again from its cache.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from tgserve.core.grammar import GrammarSpec
from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.step_stats import StepStats

PROMPT = "The river ran past the old house and the small garden"
# An array of at least 64 strings: a JSON mask at every position (string content, separators), never complete.
JSON_SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": 64}
REGEX = r"[a-z ,.]+"  # lowercase text without end: an unbounded repeat
COUNTED_REGEX = r"[a-z ,.]{400,}"  # the same text, a counted repeat that cannot complete within --new-tokens


class _Steps:
    """A `StepObserver` keeping the duration of every decode step that held `num_seqs` sequences."""

    def __init__(self, num_seqs: int):
        self.num_seqs = num_seqs
        self.durations_s: list[float] = []
        self.errors: list[str] = []

    def on_step(self, stats: StepStats) -> None:
        if stats.num_prefill_tokens == 0 and stats.num_seqs == self.num_seqs:
            self.durations_s.append(stats.duration_s)

    def on_idle(self) -> None:
        pass

    def sink(self, event) -> None:
        message = getattr(event, "message", None)
        if message is not None:
            self.errors.append(message)


def run_workload(engine, grammar, batch_size: int, new_tokens: int) -> list[float]:
    """Seconds of each full decode step of `batch_size` requests under `grammar` (None: unconstrained)."""
    steps = _Steps(batch_size)
    prompt = engine.tokenizer.encode(PROMPT)
    for _ in range(batch_size):
        engine.submit(GenerationRequest(list(prompt), SamplingParams(), StoppingParams(new_tokens, ignore_eos_token=True),
                                        grammar=grammar), steps.sink)
    engine.set_observer(steps)
    try:
        while engine.num_in_flight:
            engine.step()
    finally:
        engine.set_observer(None)
    if steps.errors:
        raise RuntimeError(steps.errors[0])
    return steps.durations_s


def measure(engine, batch_sizes: list[int], new_tokens: int, num_rounds: int) -> list[dict]:
    compiler = engine.grammar_compiler
    workloads = {"none": None, "json": compiler.compile(GrammarSpec.json_schema(JSON_SCHEMA)),
                 "regex": compiler.compile(GrammarSpec.regex(REGEX)),
                 "regex-count": compiler.compile(GrammarSpec.regex(COUNTED_REGEX))}
    durations = {(b, name): [] for b in batch_sizes for name in workloads}
    run_workload(engine, None, max(batch_sizes), 4)  # first steps of a fresh engine are slow
    names = list(workloads)
    for round_index in range(num_rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]  # each goes first in turn
        for batch_size in batch_sizes:
            for name in order:
                durations[(batch_size, name)] += run_workload(engine, workloads[name], batch_size, new_tokens)
    rows = []
    for (batch_size, name), values in durations.items():
        step_ms = statistics.median(values) * 1e3
        base_ms = statistics.median(durations[(batch_size, "none")]) * 1e3
        rows.append({"batch_size": batch_size, "workload": name, "num_steps": len(values), "step_ms": step_ms,
                     "ms_per_token": step_ms / batch_size, "overhead_pct": 100 * (step_ms / base_ms - 1),
                     "extra_us_per_row": 1e3 * (step_ms - base_ms) / batch_size})
    return rows


def compile_times(compiler) -> list[dict]:
    """Cold and cached compile ms of every valid grammar of the library benchmark's set."""
    from tgserve.benchmark.grammar_workloads import CASES

    rows = []
    for case in CASES:
        if case.expect != "valid":
            continue
        spec = GrammarSpec.json_schema(json.loads(case.text)) if case.kind == "json" else GrammarSpec.regex(case.text)
        times_ms = []
        for _ in range(2):
            start = time.perf_counter()
            compiler.compile(spec)
            times_ms.append((time.perf_counter() - start) * 1e3)
        rows.append({"case": case.name, "cold_ms": times_ms[0], "cached_ms": times_ms[1]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", default=None, help="checkpoint folder (default: the demo model)")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--result-file", default=None)
    args = parser.parse_args(argv)
    from tgserve.checkpoints.demo_model import ensure_demo_model
    from tgserve.core.config import ServerConfig
    from tgserve.core.engine_builder import build_engine
    from tgserve.core.plugins import BackendRegistry

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    model_id = args.model_id or str(ensure_demo_model())
    config = ServerConfig(model_id=model_id, max_batch_size=max(batch_sizes), max_concurrent_requests=max(batch_sizes),
                          max_total_tokens=args.new_tokens + 64, max_batch_prefill_tokens=64 * max(batch_sizes))
    engine = build_engine(config, BackendRegistry().select("cpu"), progress=False)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    compiles = compile_times(engine.grammar_compiler)
    rows = measure(engine, batch_sizes, args.new_tokens, args.rounds)
    print(f"{model_id}; {args.new_tokens} new tokens, {args.rounds} rounds; started {started}")
    print(f"{'grammar':>25} {'cold ms':>8} {'cached ms':>9}")
    for row in compiles:
        print(f"{row['case']:>25} {row['cold_ms']:>8.2f} {row['cached_ms']:>9.3f}")
    print(f"{'batch':>5} {'workload':>11} {'steps':>5} {'step ms':>8} {'ms/token':>8} {'overhead':>8} {'us/row':>7}")
    for row in rows:
        print(f"{row['batch_size']:>5} {row['workload']:>11} {row['num_steps']:>5} {row['step_ms']:>8.2f} "
              f"{row['ms_per_token']:>8.3f} {row['overhead_pct']:>7.1f}% {row['extra_us_per_row']:>7.1f}")
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump({"model_id": model_id, "started_utc": started, "new_tokens": args.new_tokens, "rows": rows,
                       "compiles": compiles}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
