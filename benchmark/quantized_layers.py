"""Per-layer speed of the cpu backend's weight-only kernels beside its dense (oneDNN-packed) linear.

  python -m tgserve.benchmark.quantized_layers [--dtype bfloat16] [--batch-sizes 1,8] [--result-file F]

Random weights of Qwen2-0.5B's linear shapes (qkv, gate_up, down, lm_head; o_proj is 896 -> 896),
each layer prepared once by the method the cpu backend hands the engine, then timed per call (the
median of `--runs` calls after warm-up calls) at each batch size. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from tgserve.backends.cpu.kernels import detect_kernels
from tgserve.backends.cpu.linear import make_onednn_linear_method
from tgserve.backends.cpu.weight_only import CpuInt4Kernel, CpuInt8Kernel, is_usable
from tgserve.benchmark.engine_bench import cpu_model
from tgserve.benchmark.weight_bytes import reachable_tensors, tensor_bytes
from tgserve.core.layers.linear import LinearMethod
from tgserve.core.quantization.eetq import quantize_per_channel
from tgserve.core.quantization.weight_only import AffineQuantizedWeight

QWEN2_0_5B_SHAPES = ((896, 1152), (896, 896), (896, 9728), (4864, 896), (896, 151936))  # (in, out)
INT4_GROUP_SIZE = 128


def _int8_weight(dense: torch.Tensor) -> AffineQuantizedWeight:
    codes, scales = quantize_per_channel(dense)
    return AffineQuantizedWeight(q=(codes.to(torch.int16) + 128).to(torch.uint8), scales=scales[:, None],
                                 zeros=torch.full_like(scales[:, None], 128.0), bits=8, group_size=dense.shape[1],
                                 input_perm=None, bias=None)


def _int4_weight(dense: torch.Tensor) -> AffineQuantizedWeight:
    groups = dense.float().reshape(dense.shape[0], -1, INT4_GROUP_SIZE)
    scales = (groups.abs().amax(-1) / 7).clamp_min(1e-8)
    codes = (torch.round(groups / scales[..., None]) + 8).clamp(0, 15).to(torch.uint8).reshape(dense.shape)
    return AffineQuantizedWeight(q=codes, scales=scales, zeros=torch.full_like(scales, 8.0), bits=4,
                                 group_size=INT4_GROUP_SIZE, input_perm=None, bias=None)


def _time_ms(call, runs: int, warmups: int) -> float:
    for _ in range(warmups):
        call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def measure(dtype: torch.dtype, batch_sizes: tuple[int, ...], runs: int, warmups: int) -> list[dict]:
    """One row per (shape, method, batch size): median ms per call, and the prepared layer's bytes."""
    rows = []
    dense_method = make_onednn_linear_method(dtype) or LinearMethod()
    generator = torch.Generator().manual_seed(0)
    for in_features, out_features in QWEN2_0_5B_SHAPES:
        dense = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(dtype)
        layers = {f"dense ({dense_method.name})": (dense_method.prepare({"weight": dense}), dense_method.apply)}
        for kernel, make in ((CpuInt8Kernel(), _int8_weight), (CpuInt4Kernel(), _int4_weight)):
            prepared = kernel.prepare(make(dense), dtype) if is_usable(kernel.name, dtype) else None
            if prepared is not None:
                layers[kernel.name] = (prepared, kernel.apply)
        for name, (prepared, apply) in layers.items():
            size = tensor_bytes(reachable_tensors(prepared))
            for batch_size in batch_sizes:
                x = torch.randn(batch_size, in_features, generator=generator).to(dtype)
                with torch.no_grad():
                    ms = _time_ms(lambda: apply(prepared, x), runs, warmups)
                rows.append({"in_features": in_features, "out_features": out_features, "method": name,
                             "batch_size": batch_size, "ms": ms, "weight_bytes": size})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| layer [in -> out] | method | batch | ms / call | weight MB |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| [{row['in_features']} -> {row['out_features']}] | {row['method']} | {row['batch_size']} "
                     f"| {row['ms']:.3f} | {row['weight_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmups", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--result-file", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = measure(dtype, tuple(int(b) for b in args.batch_sizes.split(",")), args.runs, args.warmups)
    meta = {"cpu_model": cpu_model(), "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
            "isa": detect_kernels(os.environ.get("TGSERVE_CPU_ISA", "auto")).isa, "threads": torch.get_num_threads(),
            "dtype": args.dtype, "load_avg_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(meta))
    print(format_table(rows))
    if args.result_file:
        with open(args.result_file, "w") as out:
            json.dump({"meta": meta, "rows": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
