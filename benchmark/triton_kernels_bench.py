"""The GPU backends' Triton weight-only kernels beside the dense bf16 matmul, per linear shape.

What the gpu-check step `quant-kernels` records (issue 12, item 7's GPU rows): for each fused linear of
one decoder layer (qkv, o, gate_up, down at Qwen2-7B's sizes on the device) and each row count
(decode batch 1 and 32), the median time of bf16 `F.linear`, the Triton int8 kernel (one scale per
output channel, eetq's layout) and the Triton int4 kernel (group 128, GPTQ's), each first checked
against the core's reference kernel on the same inputs. On a GPU every call is timed between CUDA
events after a write of `flush_bytes` that evicts the weights from L2 (decode reads them from HBM,
as a real step does); on a CPU (the small CI run, the kernels under TRITON_INTERPRET=1) by the clock.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from tgserve.core.quantization.weight_only import AffineQuantizedWeight, ReferenceKernel

INT4_GROUP_SIZE = 128
MAX_REL_ERROR = 2e-2  # a bf16 output against the reference's, relative to its largest value


@dataclass(slots=True, frozen=True)
class KernelBenchConfig:
    """One run: the shapes, row counts and repetitions."""

    linears: tuple[tuple[str, int, int], ...]  # (name, in_features, out_features) per fused linear
    num_rows: tuple[int, ...]  # activation rows per call: decode batch sizes
    device: str  # "cuda" on the device, "cpu" in the small run
    int4_group_size: int = INT4_GROUP_SIZE
    runs: int = 30  # timed calls per row (the median is reported)
    warmups: int = 3  # untimed calls first; the first compiles the kernel
    flush_bytes: int = 256 << 20  # written before each timed call on a GPU (0: no flush); > H200's 60 MiB L2
    dtype: torch.dtype = torch.bfloat16


def decoder_linears(dims: dict) -> tuple[tuple[str, int, int], ...]:
    """A Qwen2 / Llama decoder layer's linears as tgserve fuses them, from config.json's dims."""
    hidden, intermediate = dims["hidden_size"], dims["intermediate_size"]
    head_dim = dims.get("head_dim") or hidden // dims["num_attention_heads"]
    qkv = hidden + 2 * dims["num_key_value_heads"] * head_dim
    return (("qkv_proj", hidden, qkv), ("o_proj", hidden, hidden), ("gate_up_proj", hidden, 2 * intermediate),
            ("down_proj", intermediate, hidden))


def random_affine(out_features: int, in_features: int, bits: int, group_size: int, device: str,
                  generator: torch.Generator) -> AffineQuantizedWeight:
    """Random codes with asymmetric zeros; scales of a bf16 weight of std ~0.02."""
    num_groups = in_features // group_size
    scales = torch.rand(out_features, num_groups, generator=generator, device=device) * 0.01 / 2 ** (bits - 4) + 1e-4
    return AffineQuantizedWeight(
        q=torch.randint(0, 2**bits, (out_features, in_features), generator=generator, device=device, dtype=torch.uint8),
        scales=scales.half().float(),
        zeros=torch.randint(0, 2**bits, (out_features, num_groups), generator=generator, device=device).float(),
        bits=bits, group_size=group_size, input_perm=None, bias=None)


def time_ms(call, config: KernelBenchConfig, flush: torch.Tensor | None) -> float:
    """The median of `config.runs` calls after `config.warmups`: CUDA events on a GPU, the clock elsewhere."""
    for _ in range(config.warmups):
        call()
    samples = []
    if config.device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(config.runs)]
        for start, end in events:
            if flush is not None:
                flush.zero_()
            start.record()
            call()
            end.record()
        torch.cuda.synchronize()
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(config.runs):
            start_s = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(samples)


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_kernel_bench(config: KernelBenchConfig) -> list[dict]:
    """One row per (linear, rows, kernel): median ms, weight bytes, GB/s of weight read, and for the
    quantized kernels the error against the reference and the launch config."""
    from tgserve.backends.cuda import triton_weight_only as triton_kernels  # imports triton

    generator = torch.Generator(device=config.device).manual_seed(0)
    flush = (torch.empty(config.flush_bytes, dtype=torch.uint8, device=config.device)
             if config.device == "cuda" and config.flush_bytes else None)
    rows = []
    for name, in_features, out_features in config.linears:
        dense = (torch.randn(out_features, in_features, generator=generator, device=config.device) * 0.02
                 ).to(config.dtype)
        quantized = {"int8": (triton_kernels.TritonInt8Kernel(), random_affine(
                         out_features, in_features, 8, in_features, config.device, generator)),
                     "int4": (triton_kernels.TritonInt4Kernel(), random_affine(
                         out_features, in_features, 4, config.int4_group_size, config.device, generator))}
        prepared = {kind: (kernel, kernel.prepare(weight, config.dtype), weight)
                    for kind, (kernel, weight) in quantized.items()}
        for num_rows in config.num_rows:
            x = torch.randn(num_rows, in_features, generator=generator, device=config.device).to(config.dtype)
            with torch.inference_mode():
                dense_ms = time_ms(lambda: F.linear(x, dense), config, flush)
                rows.append(_row(name, in_features, out_features, num_rows, "bf16", dense_ms, _bytes(dense)))
                for kind, (kernel, packed, weight) in prepared.items():
                    y = kernel.apply(packed, x).float()
                    expected = ReferenceKernel().apply(ReferenceKernel().prepare(weight, config.dtype), x).float()
                    error = ((y - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
                    ms = time_ms(lambda: kernel.apply(packed, x), config, flush)
                    row = _row(name, in_features, out_features, num_rows, kind, ms,
                               _bytes(packed.codes, packed.scales, packed.zeros))
                    rows.append({**row, "speedup_vs_bf16": round(dense_ms / ms, 3), "max_rel_error": error,
                                 "config": asdict(triton_kernels.launch_config(x, packed))})
        del dense, quantized, prepared
    return rows


def _row(name: str, in_features: int, out_features: int, num_rows: int, kernel: str, ms: float,
         weight_bytes: int) -> dict:
    return {"linear": name, "in_features": in_features, "out_features": out_features, "num_rows": num_rows,
            "kernel": kernel, "ms": ms, "weight_bytes": weight_bytes, "weight_gb_per_s": weight_bytes / ms / 1e6}


def layer_totals(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{num_rows: {kernel: ms}}: one decoder layer's linears together (the sum over linears)."""
    totals: dict[str, dict[str, float]] = {}
    for row in rows:
        per_kernel = totals.setdefault(str(row["num_rows"]), {})
        per_kernel[row["kernel"]] = per_kernel.get(row["kernel"], 0.0) + row["ms"]
    return totals


def is_correct(rows: list[dict]) -> bool:
    return all(row.get("max_rel_error", 0.0) <= MAX_REL_ERROR for row in rows)


def format_table(rows: list[dict]) -> str:
    """A markdown table: one line per (linear, rows, kernel)."""
    lines = ["| linear | in -> out | rows | kernel | ms | weight GB/s | vs bf16 | max rel error |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        speedup = f"{row['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in row else ""
        error = f"{row['max_rel_error']:.1e}" if "max_rel_error" in row else ""
        lines.append(f"| {row['linear']} | {row['in_features']} -> {row['out_features']} | {row['num_rows']} | "
                     f"{row['kernel']} | {row['ms']:.4f} | {row['weight_gb_per_s']:.0f} | {speedup} | {error} |")
    return "\n".join(lines)


def headline(rows: list[dict], shape: str, device_name: str) -> str:
    """One line: per decoder layer and row count, bf16 ms and each kernel's ms and speedup; the worst error."""
    parts = [f"{shape} linears on {device_name}"]
    for num_rows, per_kernel in layer_totals(rows).items():
        dense_ms = per_kernel["bf16"]
        kernels = ", ".join(f"{kind} {ms:.3f} ({dense_ms / ms:.2f}x)" for kind, ms in per_kernel.items()
                            if kind != "bf16")
        parts.append(f"b{num_rows} per layer bf16 {dense_ms:.3f} ms, {kernels}")
    worst = max((row["max_rel_error"] for row in rows if "max_rel_error" in row), default=0.0)
    parts.append(f"max rel error {worst:.1e} ({'within' if worst <= MAX_REL_ERROR else 'NOT within'} "
                 f"{MAX_REL_ERROR})")
    return "; ".join(parts)
