"""`tgserve benchmark compare`: tgserve and the peer engines on one checkpoint and workload, one table.

tgserve is measured by the engine micro-benchmark in this process (built and stepped on this
thread); each peer by its runner in a child process with its own python, one after the other, so
no two engines share the cores. Every column gets the same metric names (peer_protocol.py):
  - decode ms/token at batch 1: tgserve's mean decode step; a peer's marginal token time;
  - TTFT: tgserve's median prefill step (it samples the first token); a peer's median 1-token call;
  - output tokens/s at each batch size: batch * decode_length / the wall time of prefill + decode;
  - the roofline: one batch-1 decode floor for the checkpoint (same bytes for every engine at this
    dtype), measured in this run, and each engine's floor / decode ms.
With --rounds N the whole sequence (tgserve, then each peer) runs N times and each cell is the median
over the rounds: on a shared VM memory bandwidth swings by 1.5x for minutes at a time, so engines
measured once, minutes apart, can be compared in different weather; interleaved rounds cannot.
"""
from __future__ import annotations

import gc
import statistics
from dataclasses import replace
from pathlib import Path

from tgserve.benchmark.engine_bench import EngineBenchConfig, run_engine_bench
from tgserve.benchmark.engine_report import busy_warning
from tgserve.benchmark.peers import registry

IMPOSSIBLE_FRACTION = 1.05  # above this a decode figure beats physics: flagged, not hidden


def tgserve_result(report: dict) -> dict:
    """The engine micro-benchmark's report as a peer-style result (the same metric names)."""
    rows = {row["batch_size"]: row for row in report["results"]}
    one = rows[1]
    metrics = {"decode_ms_per_token": one["decode"]["avg_ms"], "ttft_ms": one["prefill"]["p50_ms"],
               "output_tokens_per_s": {str(b): row["output_tokens_per_s"]["avg"] for b, row in rows.items() if b != 1}}
    quantization = report["meta"].get("quantization")
    engine = f"tgserve ({quantization['method']})" if quantization else "tgserve"
    return {"engine": engine, "version": report["meta"].get("tgserve", ""), "is_available": True,
            "metrics": metrics, "settings": {"threads": report["meta"]["torch_threads"],
                                              "backend": report["meta"]["backend"]}, "notes": []}


def add_fractions(results: list[dict], floor_ms: float | None) -> None:
    """Set metrics["fraction_of_floor"] = floor_ms / decode_ms_per_token on every available result."""
    for result in results:
        if result.get("is_available") and floor_ms:
            fraction = floor_ms / result["metrics"]["decode_ms_per_token"]
            result["metrics"]["fraction_of_floor"] = fraction
            if fraction > IMPOSSIBLE_FRACTION:
                result.setdefault("notes", []).append(
                    f"decode faster than the memory floor ({fraction:.2f}x): a noisy measurement (more --runs, a quiet "
                    "machine) or a bandwidth probe that under-reads this device")


def _cell(result: dict, key: str, sub: str | None, digits: int) -> str:
    if not result.get("is_available"):
        return "n/a"
    value = result["metrics"].get(key)
    if sub is not None:
        value = (value or {}).get(sub)
    return "-" if value is None else f"{value:.{digits}f}"


def format_compare_table(results: list[dict], roofline: dict | None, sequence_length: int,
                         batch_sizes: list[int], tgserve_meta: dict | None = None) -> str:
    """One row per metric, one column per engine; unavailable engines get n/a and their reason below."""
    rows = [("decode ms/token, batch 1", "decode_ms_per_token", None, 1),
            (f"TTFT ms, {sequence_length}-token prompt", "ttft_ms", None, 1)]
    rows += [(f"output tok/s, batch {b}", "output_tokens_per_s", str(b), 1) for b in batch_sizes]
    rows += [("floor / decode, batch 1", "fraction_of_floor", None, 2)]
    lines = ["| metric | " + " | ".join(r["engine"] for r in results) + " |", "|---|" + "---|" * len(results)]
    for label, key, sub, digits in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(r, key, sub, digits) for r in results) + " |")
    warning = busy_warning(tgserve_meta) if tgserve_meta else ""
    if warning:
        lines.append("\n" + warning)
    if roofline:
        lines.append(f"\nbatch-1 decode floor: {roofline['batch1_floor_ms']:.2f} ms = "
                     f"{roofline['batch1_decode_bytes'] / 1e6:.1f} MB read per step / "
                     f"{roofline['read_bytes_per_s'] / 1e9:.1f} GB/s measured in this run")
    for result in results:
        if not result.get("is_available"):
            lines.append(f"{result['engine']}: not measured: {result.get('reason', 'no reason given')}")
        for note in result.get("notes", []):
            lines.append(f"{result['engine']}: {note}")
    return "\n".join(lines)


def run_compare(config: EngineBenchConfig, peers: list[str], venvs_dir: Path, timeout_s: float,
                threads: int | None = None, rounds: int = 1, peer_model_dir: Path | None = None) -> dict:
    """`rounds` x (tgserve in this process, then each peer); returns {"tgserve_report", "roofline",
    "results", "rounds"}: each result holds the median of its metrics over the rounds. `peer_model_dir`:
    the float checkpoint the peers convert when tgserve runs a pre-quantized one (GPTQ / AWQ int4 beside
    llama.cpp's Q4_0 of the same float model); default: tgserve's own checkpoint."""
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    runs = [_run_round(config, peers, venvs_dir, timeout_s, threads, peer_model_dir) for _ in range(rounds)]
    roofline = dict(runs[-1]["roofline"]) if runs[-1]["roofline"] else None
    if roofline:
        roofline["batch1_floor_ms"] = statistics.median(r["roofline"]["batch1_floor_ms"] for r in runs)
        roofline["read_bytes_per_s"] = statistics.median(r["roofline"]["read_bytes_per_s"] for r in runs)
    results = merge_rounds([r["results"] for r in runs])
    add_fractions(results, roofline["batch1_floor_ms"] if roofline else None)
    return {"tgserve_report": runs[-1]["tgserve_report"], "roofline": roofline, "results": results,
            "rounds": [r["results"] for r in runs]}


def _run_round(config: EngineBenchConfig, peers: list[str], venvs_dir: Path, timeout_s: float,
               threads: int | None, peer_model_dir: Path | None = None) -> dict:
    """tgserve (in this process), then each peer, once."""
    import torch

    config = replace(config, batch_sizes=tuple(sorted({1, *config.batch_sizes})))
    report = run_engine_bench(config)
    gc.collect()  # the engine is dropped before the peers load their copies of the model
    results = [tgserve_result(report)]
    weight_bits = quantized_bits(report["meta"].get("quantization"))
    args = registry.runner_args(peer_model_dir or Path(report["meta"]["model_dir"]), report["meta"]["dtype"], config.sequence_length,
                                config.decode_length, [b for b in config.batch_sizes if b != 1], config.runs,
                                config.warmups, threads or torch.get_num_threads(), config.seed, weight_bits)
    on_cpu = report["meta"]["device"] == "cpu"
    for name in peers:
        spec = registry.PEERS[name]
        if spec.is_cpu_only and not on_cpu:
            results.append(registry.unavailable(spec, f"a CPU engine; tgserve ran on {report['meta']['device']}"))
            continue
        result = registry.run_peer(spec, venvs_dir, args, timeout_s)
        if weight_bits and not spec.runs_quantized and result.get("is_available"):
            result.setdefault("notes", []).append(f"float weights ({report['meta']['dtype']}): it has no "
                                                  f"{weight_bits}-bit weight-only mode here")
        if weight_bits and spec.runs_quantized and result.get("is_available"):
            result["engine"] += f" ({result.get('settings', {}).get('gguf_type', '?')})"
        results.append(result)
    return {"tgserve_report": report, "roofline": report["roofline"], "results": results}


def quantized_bits(quantization: dict | None) -> int:
    """8 or 4 for tgserve's int8 / int4-or-narrower weight-only runs (the peers' Q8_0 / Q4_0), else 0."""
    bits = (quantization or {}).get("bits")
    return 0 if not bits else 8 if bits > 4 else 4


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """Per engine (same column order in every round), each metric's median over the rounds where the
    engine ran; an engine unavailable in every round stays as the last round reported it."""
    merged = []
    for column in zip(*rounds):
        available = [r for r in column if r.get("is_available")]
        if not available:
            merged.append(column[-1])
            continue
        metrics = {"decode_ms_per_token": statistics.median(r["metrics"]["decode_ms_per_token"] for r in available),
                   "ttft_ms": statistics.median(r["metrics"]["ttft_ms"] for r in available),
                   "output_tokens_per_s": {}}
        for batch in available[-1]["metrics"].get("output_tokens_per_s", {}):
            values = [r["metrics"]["output_tokens_per_s"][batch] for r in available
                      if batch in r["metrics"].get("output_tokens_per_s", {})]
            metrics["output_tokens_per_s"][batch] = statistics.median(values)
        notes = [n for n in available[-1].get("notes", []) if "memory floor" not in n]
        merged.append({**available[-1], "metrics": metrics, "notes": notes, "num_rounds": len(available)})
    return merged
