"""Summaries and tables of `tgserve benchmark engine`: latency percentiles, throughput, the roofline.

The tables follow TGI's text-generation-benchmark: one latency table (Average, Lowest, Highest,
p50, p90, p99 per step kind and batch size) and one throughput table; a third gives each decode
row against the memory-bandwidth floor.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LATENCY_KEYS = ("avg_ms", "min_ms", "max_ms", "p50_ms", "p90_ms", "p99_ms")
BUSY_LOAD_PER_CPU = 0.5  # 1-minute load average per CPU above which a run is flagged


def latency_stats(samples_s: list[float]) -> dict:
    """avg / min / max / p50 / p90 / p99 of latencies given in seconds, in milliseconds (linear percentiles)."""
    if not samples_s:
        raise ValueError("no latency samples")
    ms = np.asarray(samples_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"avg_ms": float(ms.mean()), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "num_samples": len(samples_s)}


def throughput(num_tokens: int, samples_s: list[float]) -> dict:
    """Tokens/s of a step that computes `num_tokens`: at the mean latency (avg), the slowest (min), the fastest (max)."""
    mean_s = sum(samples_s) / len(samples_s)
    return {"avg": num_tokens / mean_s, "min": num_tokens / max(samples_s), "max": num_tokens / min(samples_s)}


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).rjust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def _latency_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for step, key in (("Prefill", "prefill"), ("Decode (token)", "decode"), ("Decode (total)", "decode_total")):
        for row in results:
            rows.append([step, str(row["batch_size"])] + [f"{row[key][k]:.2f} ms" for k in LATENCY_KEYS])
    return rows


def _throughput_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for step, key in (("Prefill", "prefill"), ("Decode", "decode")):
        for row in results:
            tps = row[key]["tokens_per_s"]
            rows.append([step, str(row["batch_size"])] + [f"{tps[k]:.1f} tokens/s" for k in ("avg", "min", "max")])
    return rows


def busy_warning(meta: dict) -> str:
    """A warning line when other processes kept the CPUs busy as the run started, else ''.

    Measured on the 2-core VM: with a second process on the cores, a 2-thread torch step can run
    tens of times slower (each OpenMP barrier waits for a preempted thread), not just 2x.
    """
    load = meta.get("load_avg_1m_before")
    if load is None or load < BUSY_LOAD_PER_CPU * meta["cpus"]:
        return ""
    return (f"WARNING: load average {load:.1f} on {meta['cpus']} CPUs before the run: other processes share the "
            "cores, these figures are not comparable")


def format_engine_report(report: dict) -> str:
    """The printed form of a `run_engine_bench` report: header, latency, throughput and roofline tables."""
    meta, results = report["meta"], report["results"]
    parts = [f"Model: {meta['model_id']} ({meta['dtype']}, backend {meta['backend']}, device {meta['device']}, "
             f"{meta['torch_threads']} threads) | sequence length {meta['sequence_length']} | decode length "
             f"{meta['decode_length']} | runs {meta['runs']} (+{meta['warmups']} warm-up)",
             *([busy_warning(meta)] if busy_warning(meta) else []),
             *([_weights_line(meta)] if meta.get("weight_bytes") else []),
             _table(["Step", "Batch Size", "Average", "Lowest", "Highest", "p50", "p90", "p99"], _latency_rows(results)),
             _table(["Step", "Batch Size", "Average", "Lowest", "Highest"], _throughput_rows(results))]
    line = report.get("roofline")
    if line:
        parts.append(
            f"Roofline: checkpoint {line['checkpoint_bytes'] / 1e6:.1f} MB, resident {line['resident_weight_bytes'] / 1e6:.1f} MB"
            f"{' (tied head kept packed twice)' if line['is_tied'] else ''}, read per batch-1 decode step "
            f"{line['batch1_decode_bytes'] / 1e6:.1f} MB; measured read bandwidth {line['read_bytes_per_s'] / 1e9:.1f} GB/s "
            f"({line['bandwidth_probe']['num_threads']} threads); batch-1 decode floor {line['batch1_floor_ms']:.2f} ms")
        rows = [[str(r["batch_size"]), f"{r['decode']['avg_ms']:.2f}", f"{r['decode']['floor_ms']:.2f}",
                 f"{r['decode']['fraction_of_floor']:.2f}"] for r in results]
        parts.append(_table(["Batch Size", "Decode avg ms", "Floor ms", "Floor / measured"], rows))
        if any(r["decode"]["fraction_of_floor"] > 1.05 for r in results):
            parts.append("NOTE: a decode step beat the floor: the bandwidth probe under-read this device or the run was noisy")
    return "\n\n".join(parts)


def _weights_line(meta: dict) -> str:
    quantization = (meta.get("quantization") or {}).get("description") or "not quantized"
    return (f"Weights resident: {meta['weight_bytes']['total_bytes'] / 1e6:.1f} MB, of which linear layers "
            f"{meta['weight_bytes']['linear_bytes'] / 1e6:.1f} MB ({quantization})")


def write_report(path: str | Path, report: dict) -> None:
    """Write the report as indented JSON, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
