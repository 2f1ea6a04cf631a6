"""Per-layer speed of the cpu backend's weight-only kernels beside its dense (oneDNN-packed) linear.

  tgserve benchmark layers [--dtype bfloat16] [--batch-sizes 1,8] [--threads 2] [--result-file F]

Random weights of Qwen2-0.5B's linear shapes (fused qkv, o_proj, k/v alone, one of gate/up, fused
gate_up, down, lm_head), each layer prepared once by every weight-only kernel the cpu backend has here
(native int8 per channel, native int4 g128 and g32, torch's int8 / int4 ops), then timed per call at
each batch size. The methods run interleaved, `--rounds` times `--runs` calls each, so load from other
processes hits them alike; the table gives each median and its ratio to the dense linear's median
from the same rounds (`vs dense` < 1: faster). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from tgserve.backends.cpu import plugin
from tgserve.backends.cpu.kernels import detect_kernels
from tgserve.backends.cpu.linear import make_onednn_linear_method
from tgserve.backends.cpu.native_weight_only import NativeInt4Kernel, NativeInt8Kernel, make_native_kernels
from tgserve.backends.cpu.weight_only import CpuInt4Kernel, CpuInt8Kernel, is_usable
from tgserve.benchmark.engine_bench import cpu_model
from tgserve.benchmark.layers_cli import add_layer_arguments
from tgserve.benchmark.weight_bytes import reachable_tensors, tensor_bytes
from tgserve.core.layers.linear import LinearMethod
from tgserve.core.quantization.eetq import quantize_per_channel
from tgserve.core.quantization.weight_only import AffineQuantizedWeight

# (in, out): qkv fused, o_proj, k or v, gate or up, gate_up fused, down, lm_head
QWEN2_0_5B_SHAPES = ((896, 1152), (896, 896), (896, 128), (896, 4864), (896, 9728), (4864, 896), (896, 151936))
INT4_GROUP_SIZE = 128


def _int8_weight(dense: torch.Tensor) -> AffineQuantizedWeight:
    codes, scales = quantize_per_channel(dense)
    return AffineQuantizedWeight(q=(codes.to(torch.int16) + 128).to(torch.uint8), scales=scales[:, None],
                                 zeros=torch.full_like(scales[:, None], 128.0), bits=8, group_size=dense.shape[1],
                                 input_perm=None, bias=None)


def _int4_weight(dense: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> AffineQuantizedWeight:
    groups = dense.float().reshape(dense.shape[0], -1, group_size)
    scales = (groups.abs().amax(-1) / 7).clamp_min(1e-8)
    codes = (torch.round(groups / scales[..., None]) + 8).clamp(0, 15).to(torch.uint8).reshape(dense.shape)
    return AffineQuantizedWeight(q=codes, scales=scales, zeros=torch.full_like(scales, 8.0), bits=4,
                                 group_size=group_size, input_perm=None, bias=None)


def _time_ms(call, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _layers(dense: torch.Tensor, dtype: torch.dtype, dense_method) -> dict[str, tuple[object, object]]:
    """method name -> (prepared layer, apply) for every kernel that runs here for `dtype`."""
    layers = {f"dense ({dense_method.name})": (dense_method.prepare({"weight": dense}), dense_method.apply)}
    native = {kernel.name for kernel in make_native_kernels(dtype, plugin.native_ops())}
    candidates = [(NativeInt8Kernel(plugin.native_ops()), "cpu-native-int8", _int8_weight),
                  (NativeInt4Kernel(plugin.native_ops()), "cpu-native-int4 g128", _int4_weight),
                  (NativeInt4Kernel(plugin.native_ops()), "cpu-native-int4 g32", lambda w: _int4_weight(w, 32)),
                  (CpuInt8Kernel(), "cpu-int8", _int8_weight), (CpuInt4Kernel(), "cpu-int4", _int4_weight)]
    for kernel, label, make in candidates:
        usable = kernel.name in native if kernel.name.startswith("cpu-native") else is_usable(kernel.name, dtype)
        prepared = kernel.prepare(make(dense), dtype) if usable else None
        if prepared is not None:
            layers[label] = (prepared, kernel.apply)
    return layers


def measure(dtype: torch.dtype, batch_sizes: tuple[int, ...], runs: int, warmups: int, rounds: int = 5) -> list[dict]:
    """One row per (shape, method, batch size): median ms per call over interleaved rounds, its ratio
    to the dense method's median from the same rounds, and the prepared layer's bytes."""
    rows = []
    dense_method = make_onednn_linear_method(dtype) or LinearMethod()
    generator = torch.Generator().manual_seed(0)
    for in_features, out_features in QWEN2_0_5B_SHAPES:
        dense = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(dtype)
        layers = _layers(dense, dtype, dense_method)
        for batch_size in batch_sizes:
            x = torch.randn(batch_size, in_features, generator=generator).to(dtype)
            samples = {name: [] for name in layers}
            with torch.no_grad():
                for name, (prepared, apply) in layers.items():
                    _time_ms(lambda: apply(prepared, x), warmups)
                for _ in range(rounds):
                    for name, (prepared, apply) in layers.items():
                        samples[name] += _time_ms(lambda: apply(prepared, x), runs)
            medians = {name: statistics.median(values) for name, values in samples.items()}
            dense_ms = medians[next(iter(layers))]
            for name, (prepared, _) in layers.items():
                rows.append({"in_features": in_features, "out_features": out_features, "method": name,
                             "batch_size": batch_size, "ms": medians[name], "vs_dense": medians[name] / dense_ms,
                             "weight_bytes": tensor_bytes(reachable_tensors(prepared))})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| layer [in -> out] | method | batch | ms / call | vs dense | weight MB |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| [{row['in_features']} -> {row['out_features']}] | {row['method']} | {row['batch_size']} "
                     f"| {row['ms']:.3f} | {row['vs_dense']:.2f} | {row['weight_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Measure, print the table, write the JSON (`tgserve benchmark layers` and `main`)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = measure(dtype, tuple(int(b) for b in args.batch_sizes.split(",")), args.runs, args.warmups, args.rounds)
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
