"""`tgserve benchmark speculation`: output tokens/s and mean accepted length of speculative decoding.

One engine, built with the largest `--speculate` asked for (and a draft model or Medusa heads where
the checkpoint or `--speculative-model` brings them), is stepped on the calling thread (as
`tgserve benchmark engine`) through every cell: workload x speculate x batch size x lengths
(adaptive: the proposer `--speculate` builds; fixed: always N guesses, n-gram only). A cell submits
max(batch, number of prompts) greedy requests, the workload's prompts in turn, keeping `batch` of them
in flight, and times from its first step to its last: tokens/s = generated tokens / that time (prefill
included). Mean accepted length = generated tokens per step that emitted tokens for a request (1.0
without speculation). Decode rows per token = rows computed beyond prompts per token after the
first (1.0 without speculation; what guesses cost). transformers' `generate` runs the same prompts
in the same process (`speculation_peer.py`).
"""
from __future__ import annotations

import importlib.metadata
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, fields

from tgserve.backends.cpu.host import cpu_model_name as cpu_model
from tgserve.benchmark.speculation_workloads import WORKLOADS, workload_ids
from tgserve.core.request import ErrorEvent, GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.step_stats import StepStats

MAX_INPUT_TOKENS = 1024  # the workloads' prompts are a few hundred tokens under any tokenizer
LENGTHS = ("adaptive", "fixed")


@dataclass(slots=True, frozen=True)
class SpeculationBenchConfig:
    """What one `tgserve benchmark speculation` run measures."""

    model_id: str | None  # checkpoint folder or hub id; None = `tgserve serve`'s default model
    dtype: str | None = None  # None = the backend's default
    backend: str = "auto"
    speculates: tuple[int, ...] = (0, 2, 4)  # --speculate values; 0 = one token per step
    batch_sizes: tuple[int, ...] = (1, 16)  # requests in flight
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    lengths: tuple[str, ...] = LENGTHS  # adaptive and/or fixed proposal lengths
    max_new_tokens: int = 128
    max_prompts: int | None = None  # the first this many prompts of each workload; None: all
    runs: int = 1  # measured runs per cell; the cell reports the median tokens/s
    is_eos_ignored: bool = False  # generate max_new_tokens always (transformers: min_new_tokens)
    is_transformers_run: bool = True  # transformers' generate beside, batch 1
    assistant_model: str | None = None  # transformers' assisted generation with this draft (a folder)
    speculative_model: str | None = None  # tgserve's draft model (--speculative-model), where this build has one
    knee_rows: float | None = None  # the adaptive rule's row cost (adaptive.py); None: what the engine measured

    def __post_init__(self) -> None:
        if not self.speculates or min(self.speculates) < 0:
            raise ValueError(f"--speculate values must be >= 0, got {self.speculates}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if not set(self.lengths) <= set(LENGTHS) or not self.lengths:
            raise ValueError(f"lengths must be among {', '.join(LENGTHS)}, got {self.lengths}")
        if self.knee_rows is not None and self.knee_rows <= 0:
            raise ValueError(f"--knee-rows must be > 0, got {self.knee_rows}")
        if self.max_new_tokens < 1 or self.runs < 1 or (self.max_prompts is not None and self.max_prompts < 1):
            raise ValueError("--max-new-tokens, --max-prompts and --runs must be >= 1")


def server_config(config: SpeculationBenchConfig):
    """Limits for the largest batch of the longest prompts; --speculate the largest asked for."""
    from tgserve.core.config import ServerConfig

    extra = {}
    if config.speculative_model:
        if "speculative_model" not in {f.name for f in fields(ServerConfig)}:
            raise ValueError("this tgserve has no --speculative-model (a draft model); drop the option")
        extra["speculative_model"] = config.speculative_model
    max_batch = max(config.batch_sizes)
    max_total = MAX_INPUT_TOKENS + config.max_new_tokens
    return ServerConfig(model_id=config.model_id, dtype=config.dtype, backend=config.backend,
                        speculate=max(config.speculates), max_batch_size=max_batch,
                        max_concurrent_requests=max(max_batch, 128), max_input_tokens=MAX_INPUT_TOKENS,
                        max_total_tokens=max_total, max_batch_prefill_tokens=2 * MAX_INPUT_TOKENS,
                        max_batch_total_tokens=max(max_batch * max_total, 2 * MAX_INPUT_TOKENS), **extra)


class _Cell:
    """Sinks and step stats of one cell; tops the engine up to `batch` requests in flight."""

    def __init__(self, engine, prompts: list[list[int]], batch: int, config: SpeculationBenchConfig):
        self.engine, self.batch, self.config = engine, batch, config
        self.queue = deque(prompts[i % len(prompts)] for i in range(max(batch, len(prompts))))
        self.events: list[list] = []  # per request, in submission order
        self.num_done = 0
        self.errors: list[str] = []
        self.steps: list[StepStats] = []

    def on_step(self, stats: StepStats) -> None:
        self.steps.append(stats)

    def on_idle(self) -> None:
        pass

    def _submit(self) -> None:
        events: list = []
        self.events.append(events)

        def sink(event) -> None:
            if isinstance(event, ErrorEvent):
                self.errors.append(event.message)
                self.num_done += 1
                return
            events.append(event)
            self.num_done += event.finish is not None

        stopping = StoppingParams(self.config.max_new_tokens, ignore_eos_token=self.config.is_eos_ignored)
        self.engine.submit(GenerationRequest(list(self.queue.popleft()), SamplingParams(), stopping), sink)

    def run(self) -> float:
        """Submit and step until every request finished; the seconds that took."""
        self.engine.set_observer(self)
        start_s = time.perf_counter()
        try:
            while self.queue or self.num_done < len(self.events):
                while self.queue and len(self.events) - self.num_done < self.batch:
                    self._submit()
                self.engine.step()
        finally:
            self.engine.set_observer(None)
        if self.errors:
            raise RuntimeError(self.errors[0])
        return time.perf_counter() - start_s


def run_cell(engine, prompts: list[list[int]], batch: int, config: SpeculationBenchConfig) -> tuple[dict, list]:
    """One measured run: its metrics and each request's generated ids (for the same-output check)."""
    cell = _Cell(engine, prompts, batch, config)
    elapsed_s = cell.run()
    num_tokens = sum(len(events) for events in cell.events)
    num_emitting = sum(1 for events in cell.events for e in events if e.num_step_tokens)
    decode_rows = sum(s.num_tokens - s.num_prefill_tokens for s in cell.steps)
    metrics = {"num_requests": len(cell.events), "output_tokens": num_tokens, "elapsed_s": elapsed_s,
               "tokens_per_s": num_tokens / elapsed_s, "mean_accepted_length": num_tokens / max(1, num_emitting),
               "decode_rows_per_token": decode_rows / max(1, num_tokens - len(cell.events)),
               "num_steps": len(cell.steps)}
    return metrics, [[e.id for e in events] for events in cell.events]


def proposer_for(base, speculate: int, lengths: str, knee_rows: float | None = None):
    """The proposer a cell runs, from the one the engine was built with (`base`); None for --speculate 0
    or a fixed-length cell `base` cannot run. knee_rows: the adaptive rule's, fixed, instead of the one
    `base` learned from the steps so far (and goes on learning, with every adaptive cell)."""
    from tgserve.core.speculation.adaptive import DEFAULT_KNEE_ROWS, AdaptiveProposer
    from tgserve.core.speculation.ngram import NgramProposer

    if speculate == 0 or base is None:
        return None
    inner = getattr(base, "inner", base)  # the engine's proposer is adaptive around the method's own
    if inner.method == "n-gram":
        inner = NgramProposer(speculate)
    elif lengths == "fixed" and speculate != inner.num_tokens:
        return None  # a Medusa or draft proposer guesses its own N; only adaptive lengths cap it
    if lengths == "fixed":
        return inner
    if knee_rows:
        return AdaptiveProposer(inner, knee_rows, max_tokens=speculate, is_knee_fixed=True)
    return AdaptiveProposer(inner, getattr(base, "knee_rows", DEFAULT_KNEE_ROWS), max_tokens=speculate,
                            step_cost=getattr(base, "step_cost", None))


def run_engine_cells(engine, ids: dict[str, list[list[int]]], config: SpeculationBenchConfig) -> list[dict]:
    """Every tgserve cell, warm-up first; the engine's own proposer is restored after."""
    default = engine.proposer
    rows, reference = [], {}
    method = getattr(default, "method", "none")
    try:
        run_cell(engine, [next(iter(ids.values()))[0][:64]], 1, config)  # warm-up: kernels, thread pool
        for workload, prompts in ids.items():
            for batch in config.batch_sizes:
                for speculate in config.speculates:
                    for lengths in (("-",) if speculate == 0 else config.lengths):
                        proposer = proposer_for(default, speculate, lengths, config.knee_rows)
                        if speculate and proposer is None:
                            continue
                        engine.proposer = proposer
                        runs = sorted((run_cell(engine, prompts, batch, config) for _ in range(config.runs)),
                                      key=lambda run: run[0]["tokens_per_s"])
                        metrics, outputs = runs[len(runs) // 2]  # the median run by tokens/s
                        if speculate == 0:
                            reference[(workload, batch)] = outputs
                        same = reference.get((workload, batch))
                        rows.append({"engine": "tgserve", "workload": workload, "batch_size": batch,
                                     "speculate": speculate, "method": method if speculate else "none",
                                     "lengths": lengths, "knee_rows": getattr(proposer, "knee_rows", None),
                                     **metrics,
                                     "same_ids_as_speculate_0": None if same is None else outputs == same})
                        print(f"{workload}, batch {batch}, speculate {speculate} ({lengths}): "
                              f"{metrics['tokens_per_s']:.1f} tokens/s, {metrics['mean_accepted_length']:.2f} "
                              "tokens per step", file=sys.stderr, flush=True)  # a long run shows progress
    finally:
        engine.proposer = default
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup: tokens/s over the same engine's no-speculation row of the same workload and batch."""
    base = {(r["engine"], r["workload"], r["batch_size"]): r["tokens_per_s"] for r in rows if r["speculate"] == 0}
    for row in rows:
        reference = base.get((row["engine"], row["workload"], row["batch_size"]))
        row["speedup"] = row["tokens_per_s"] / reference if reference else None


def run_speculation_bench(config: SpeculationBenchConfig) -> dict:
    """The whole benchmark: tgserve's cells, then transformers' on the same prompts; a JSON-able dict."""
    import torch

    from tgserve.core.engine_builder import build_engine, resolve_source
    from tgserve.core.plugins import BackendRegistry

    load_before = os.getloadavg()[0]
    server = server_config(config)
    engine = build_engine(server, BackendRegistry().select(server.backend), progress=False)
    try:
        model_dir = resolve_source(engine.config).path
        ids = {name: prompts[:config.max_prompts]
               for name, prompts in workload_ids(engine.tokenizer, config.workloads).items()}
        rows = run_engine_cells(engine, ids, config)
        knee_rows = config.knee_rows or getattr(engine.proposer, "knee_rows", None)
    finally:
        engine.shutdown(drain_timeout_s=0)  # never started: this only calls the backend's shutdown hook
    notes = ["tokens/s include prefill; mean accepted length = tokens per step that emitted tokens"]
    if config.is_transformers_run:
        from tgserve.benchmark.speculation_peer import run_transformers

        rows += run_transformers(str(model_dir), engine.model_info.model_dtype, ids, config,
                                 engine.tokenizer.eos_token_ids)
        notes.append("transformers: batch 1 only (generate runs prompt lookup and assisted generation one "
                     "sequence at a time)")
    add_speedups(rows)
    meta = {"tgserve": importlib.metadata.version("tgserve"), "torch": torch.__version__,
            "cpu_model": cpu_model(), "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "model_id": engine.model_info.model_id,
            "model_dir": str(model_dir), "dtype": engine.model_info.model_dtype,
            "backend": engine.model_info.backend, "knee_rows": knee_rows, "load_avg_1m_before": load_before,
            "prompt_tokens": {name: [len(p) for p in prompts] for name, prompts in ids.items()}}
    return {"meta": meta, "config": asdict(config), "results": rows, "notes": notes}
