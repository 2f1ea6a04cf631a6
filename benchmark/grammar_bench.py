"""`tgserve benchmark grammar`: tokenizer build, compile time, rejections and per-step mask time per library.

Each (library, tokenizer) pair runs in its own spawned worker process, which builds the tokenizer
data once (timed: a server pays it once) and then answers one task at a time. The parent gives each
compile `compile_timeout_s`; a worker that overruns it, or dies (memory limit), is killed, the case
is reported as "timeout" / "crashed", and a fresh worker takes the remaining tasks. That is also the
only way to bound a compile that cannot be interrupted from Python.

Per-step mask time walks each valid case's answer token by token: fill the bitmask, check that the
answer's token is allowed, accept it. 1 row: one matcher; 16 rows: one matcher per row over the
valid JSON cases in turn, filled by one batched call per step where the library has one.
"""
from __future__ import annotations

import multiprocessing
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass

from tgserve.benchmark.grammar_engines import ENGINE_NAMES, GrammarRejected, engine_version
from tgserve.benchmark.grammar_tokenizers import TOKENIZER_NAMES
from tgserve.benchmark.grammar_workloads import CASES, GrammarCase

BATCH_ROWS = 16


@dataclass(slots=True, frozen=True)
class GrammarBenchConfig:
    engines: tuple[str, ...] = ENGINE_NAMES
    tokenizers: tuple[str, ...] = TOKENIZER_NAMES
    cases: tuple[str, ...] = ()  # case names to run (default: all of grammar_workloads.CASES)
    compile_timeout_s: float = 20.0  # per compile, enforced by killing the worker
    walks: int = 5  # times each answer is walked for the per-step figures
    num_threads: int = 2  # threads each library may use (compile, batched fill)
    memory_limit_bytes: int = 8 << 30  # address-space limit of a worker, so a runaway compile dies alone

    def __post_init__(self) -> None:
        for name in self.engines:
            if name not in ENGINE_NAMES:
                raise ValueError(f"unknown grammar library '{name}' (choose from {', '.join(ENGINE_NAMES)})")
        for name in self.tokenizers:
            if name not in TOKENIZER_NAMES:
                raise ValueError(f"unknown tokenizer '{name}' (choose from {', '.join(TOKENIZER_NAMES)})")
        known = {case.name for case in CASES}
        for name in self.cases:
            if name not in known:
                raise ValueError(f"unknown grammar case '{name}'")
        if self.compile_timeout_s <= 0 or self.walks < 1 or self.num_threads < 1:
            raise ValueError("--compile-timeout-s must be > 0, --walks and --threads >= 1")


def selected_cases(config: GrammarBenchConfig) -> list[GrammarCase]:
    return [case for case in CASES if not config.cases or case.name in config.cases]


# ---- the worker: runs in a spawned process, one library and one tokenizer ----

def _worker_main(conn, engine_name: str, tokenizer_name: str, num_threads: int, memory_limit_bytes: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    from transformers import AutoTokenizer

    from tgserve.benchmark.grammar_engines import import_engine, make_engine
    from tgserve.benchmark.grammar_tokenizers import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_name)
    hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer.folder)
    import_engine(engine_name)
    start = time.perf_counter()
    engine = make_engine(engine_name, tokenizer, hf_tokenizer, num_threads)
    conn.send({"tokenizer_build_s": time.perf_counter() - start, "num_tokens": len(hf_tokenizer),
               "num_logits": tokenizer.num_logits})
    worker = _Worker(engine, hf_tokenizer, tokenizer.num_logits)
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(getattr(worker, task[0])(*task[1:]))


class _Worker:
    def __init__(self, engine, hf_tokenizer, num_logits: int) -> None:
        import torch

        self._engine = engine
        self._hf_tokenizer = hf_tokenizer
        self._num_words = (num_logits + 31) // 32
        self._torch = torch
        self._compiled: dict[str, object] = {}

    def compile(self, case: GrammarCase) -> dict:
        start = time.perf_counter()
        try:
            self._compiled[case.name] = self._engine.compile(case.kind, case.text)
        except GrammarRejected as error:
            return {"status": "rejected", "compile_ms": (time.perf_counter() - start) * 1e3, "error": str(error)}
        return {"status": "ok", "compile_ms": (time.perf_counter() - start) * 1e3, "error": None}

    def walk(self, cases: list[GrammarCase], walks: int) -> dict:
        """One row: per-step fill and accept microseconds over every walk of every case's answer."""
        bitmask = self._torch.zeros((1, self._num_words), dtype=self._torch.int32)
        fill_us, accept_us, first_fill_us, new_matcher_us, failures = [], [], [], [], []
        for case in cases:
            tokens = self._hf_tokenizer.encode(case.answer, add_special_tokens=False)
            for _ in range(walks):
                start = time.perf_counter()
                matcher = self._engine.new_matcher(self._compiled[case.name])
                new_matcher_us.append((time.perf_counter() - start) * 1e6)
                for step, token in enumerate(tokens):
                    start = time.perf_counter()
                    self._engine.fill([matcher], bitmask)
                    filled = time.perf_counter()
                    is_allowed = _is_allowed(bitmask, 0, token)
                    accepted = self._engine.accept(matcher, token)
                    accept_us.append((time.perf_counter() - filled) * 1e6)
                    (first_fill_us if step == 0 else fill_us).append((filled - start) * 1e6)
                    if not (is_allowed and accepted):
                        failures.append(f"{case.name}: token {step} ({token}) "
                                        f"{'not in the mask' if not is_allowed else 'refused'}")
                        break
        return {"fill_us": _summary(fill_us), "accept_us": _summary(accept_us),
                "first_fill_us": _summary(first_fill_us), "new_matcher_us": _summary(new_matcher_us),
                "num_steps": len(fill_us), "failures": failures[:5], "num_failures": len(failures)}

    def batch(self, cases: list[GrammarCase], walks: int, rows: int) -> dict:
        """`rows` matchers over the cases in turn, advanced in lockstep for as many steps as the shortest.

        Each step is filled twice, by the batched call and by a loop of one-row fills (alternating
        which goes first): a library's batched call is not always the faster on a small machine.
        """
        bitmask = self._torch.zeros((rows, self._num_words), dtype=self._torch.int32)
        answers = [self._hf_tokenizer.encode(case.answer, add_special_tokens=False) for case in cases]
        num_steps = min(len(tokens) for tokens in answers)
        batched_us, loop_us, failures = [], [], 0
        for _ in range(walks):
            matchers = [self._engine.new_matcher(self._compiled[cases[r % len(cases)].name]) for r in range(rows)]
            tokens = [answers[r % len(cases)] for r in range(rows)]
            for step in range(num_steps):
                for is_batched in ((True, False) if step % 2 else (False, True)):
                    start = time.perf_counter()
                    if is_batched:
                        self._engine.fill(matchers, bitmask)
                    else:
                        for row, matcher in enumerate(matchers):
                            self._engine.fill_one(matcher, bitmask, row)
                    (batched_us if is_batched else loop_us).append((time.perf_counter() - start) * 1e6)
                for row, matcher in enumerate(matchers):
                    failures += not (_is_allowed(bitmask, row, tokens[row][step])
                                     and self._engine.accept(matcher, tokens[row][step]))
        return {"rows": rows, "fill_us": _summary(batched_us), "loop_fill_us": _summary(loop_us),
                "num_steps": len(batched_us), "num_failures": failures}

    def gil(self, case: GrammarCase) -> dict:
        """Compile in a thread (again and again, for at least 0.3 s) while this thread counts: the count's
        rate against an idle one says whether the library lets go of the GIL while it compiles (then a
        thread can keep the engine stepping; it still cannot stop the compile)."""
        baseline = _count_for(0.2)
        done = threading.Event()

        def compile_repeatedly() -> None:
            start = time.perf_counter()
            while time.perf_counter() - start < 0.3:
                self._engine.compile(case.kind, case.text)
            done.set()

        thread = threading.Thread(target=compile_repeatedly)
        start = time.perf_counter()
        thread.start()
        count = 0
        while not done.is_set():
            count += 1
        elapsed = time.perf_counter() - start
        thread.join()
        return {"case": case.name, "elapsed_s": elapsed, "main_thread_rate": count / elapsed / baseline}


def _count_for(seconds: float) -> float:
    """Iterations per second of the same counting loop `gil` runs, with nothing else going on."""
    done = threading.Event()
    timer = threading.Timer(seconds, done.set)
    start = time.perf_counter()
    timer.start()
    count = 0
    while not done.is_set():
        count += 1
    return count / (time.perf_counter() - start)


def _is_allowed(bitmask, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token >> 5]) >> (token & 31)) & 1)


def _summary(values: list[float]) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "mean": statistics.fmean(ordered), "count": len(ordered)}


# ---- the parent: drives one worker per (library, tokenizer) ----

class _WorkerProcess:
    def __init__(self, config: GrammarBenchConfig, engine_name: str, tokenizer_name: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_worker_main, daemon=True, args=(
            child, engine_name, tokenizer_name, config.num_threads, config.memory_limit_bytes))
        self._process.start()
        child.close()
        self.started = self._conn.recv()  # tokenizer_build_s, sizes

    def ask(self, task: tuple, timeout_s: float | None) -> dict | str:
        """The worker's answer, or "timeout" / "crashed" (the worker is then gone)."""
        self._conn.send(task)
        try:
            if self._conn.poll(timeout_s):
                return self._conn.recv()
        except EOFError:
            pass
        outcome = "crashed" if not self._process.is_alive() else "timeout"
        self.close()
        return outcome

    def close(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join()


def run_pair(config: GrammarBenchConfig, engine_name: str, tokenizer_name: str) -> dict:
    """Every measurement for one library on one tokenizer."""
    worker = _WorkerProcess(config, engine_name, tokenizer_name)
    result = {"engine": engine_name, "tokenizer": tokenizer_name, **worker.started, "compiles": {}}
    compiled_ok: list[GrammarCase] = []
    for case in selected_cases(config):
        answer = worker.ask(("compile", case), config.compile_timeout_s)
        if isinstance(answer, str):  # the worker is gone: record why, go on with a new one
            result["compiles"][case.name] = _lost_compile(answer, config.compile_timeout_s)
            worker = _WorkerProcess(config, engine_name, tokenizer_name)
            for earlier in compiled_ok:  # the new worker needs the grammars the walks use
                worker.ask(("compile", earlier), None)
            continue
        result["compiles"][case.name] = answer
        if answer["status"] == "ok" and case.answer is not None:
            compiled_ok.append(case)
    result["walk"] = worker.ask(("walk", compiled_ok, config.walks), None) if compiled_ok else None
    json_cases = [case for case in compiled_ok if case.kind == "json"]
    result["batch"] = worker.ask(("batch", json_cases, config.walks, BATCH_ROWS), None) if json_cases else None
    slowest = max(compiled_ok, key=lambda case: result["compiles"][case.name]["compile_ms"], default=None)
    result["gil"] = worker.ask(("gil", slowest), None) if slowest else None
    worker.close()
    return result


def _lost_compile(outcome: str, timeout_s: float) -> dict:
    if outcome == "timeout":
        return {"status": "timeout", "compile_ms": timeout_s * 1e3, "error": f"timeout after {timeout_s:g} s"}
    return {"status": "crashed", "compile_ms": None, "error": "the worker died (memory limit?)"}


def run_grammar_bench(config: GrammarBenchConfig, progress=print) -> dict:
    """All pairs; the report's meta records when it ran and the machine's load (numbers are wall-clock)."""
    from tgserve.benchmark.engine_bench import cpu_model

    meta = {"started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load_avg_before": os.getloadavg(),
            "cpu_model": cpu_model(), "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "versions": {name: engine_version(name) for name in config.engines},
            "num_threads": config.num_threads, "compile_timeout_s": config.compile_timeout_s, "walks": config.walks}
    missing = [name for name, version in meta["versions"].items() if version is None]
    if missing:
        raise ValueError(f"not installed: {', '.join(missing)} (pip install {' '.join(missing)})")
    results = []
    for tokenizer_name in config.tokenizers:
        for engine_name in config.engines:
            progress(f"grammar benchmark: {engine_name} on {tokenizer_name}")
            results.append(run_pair(config, engine_name, tokenizer_name))
    meta["load_avg_after"] = os.getloadavg()
    meta["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    cases = [{"name": case.name, "kind": case.kind, "expect": case.expect, "text_chars": len(case.text)}
             for case in selected_cases(config)]
    return {"meta": meta, "cases": cases, "results": results}
