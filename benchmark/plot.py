"""Latency against throughput over a sweep of request rates, as a PNG (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

from tgserve.benchmark.arrivals import format_rate
from tgserve.benchmark.serve import RateResult


def plot_sweep(results: list[RateResult], path: str | Path, title: str = "tgserve benchmark serve") -> None:
    """Two panels, TTFT and TPOT (median and p99, ms), against output token throughput (tok/s).

    Each point is one request rate, labelled with it; points are joined in sweep order.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    throughputs = [result.metrics.output_throughput_tok_s for result in results]
    labels = [format_rate(result.request_rate) for result in results]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, field_name, name in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "TPOT")):
        medians = [getattr(result.metrics, field_name).median for result in results]
        p99s = [getattr(result.metrics, field_name).p99 for result in results]
        axis.plot(throughputs, medians, marker="o", label=f"median {name}")
        axis.plot(throughputs, p99s, marker="s", linestyle="--", label=f"p99 {name}")
        for x, y, label in zip(throughputs, p99s, labels):
            axis.annotate(f"{label} req/s", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xlabel("output token throughput (tok/s)")
        axis.set_ylabel(f"{name} (ms)")
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)
