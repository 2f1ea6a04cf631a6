"""Per-layer elementwise work of the cpu backend: the native fused norm and activation beside the torch reference.

  python -m tgserve.benchmark.fused_elementwise [--dtype bfloat16] [--batch-sizes 1,8] [--hidden 896]
                                                 [--intermediate 4864] [--threads N] [--result-file F]

One decoder layer's work between its GEMMs on Qwen2-0.5B's shape (hidden 896, intermediate 4864): the
residual add and RMSNorm after attention, SiLU-and-multiply of the gate_up output, the residual add and
RMSNorm after the MLP (the next layer's input norm), on random rows. "reference" is the core's
TorchFusedOps, the same torch ops the decoder ran before the fused-ops seam; "native" is
backends/cpu/native_fused.py. The two run interleaved, `--rounds` times `--runs` layers each, so load
from other processes hits both alike; the table gives each median per layer, per op and native / reference.
Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json

import torch

from tgserve.backends.cpu import plugin
from tgserve.backends.cpu.native_fused import NativeFusedOps
from tgserve.benchmark.interleaved import interleaved_medians
from tgserve.core.layers.fused_ops import TorchFusedOps

EPS = 1e-6


def layer_work(ops, attn_out, mlp_out, residual, gate_up, weight) -> None:
    """The elementwise calls of one decoder layer, in the decoder's order."""
    _, residual = ops.add_rms_norm(attn_out, residual, weight, EPS)
    ops.silu_and_mul(gate_up)
    ops.add_rms_norm(mlp_out, residual, weight, EPS)


def time_case(implementations: dict, batch_size: int, dtype: torch.dtype, args) -> dict[str, float]:
    """Median microseconds per layer of each implementation, interleaved rounds."""
    generator = torch.Generator().manual_seed(0)
    attn_out, mlp_out, residual = (torch.randn(batch_size, args.hidden, generator=generator).to(dtype)
                                   for _ in range(3))
    gate_up = torch.randn(batch_size, 2 * args.intermediate, generator=generator).to(dtype)
    weight = (torch.rand(args.hidden, generator=generator) + 0.5).to(dtype)
    calls = {name: (lambda ops=ops: layer_work(ops, attn_out, mlp_out, residual, gate_up, weight))
             for name, ops in implementations.items()}
    return interleaved_medians(calls, args.rounds, args.warmups, args.runs)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ops = plugin.native_fused_ops()
    if ops is None:
        print("the native fused ops are unavailable here (see the log line above)")
        return 1
    implementations = {"native": NativeFusedOps(ops), "reference": TorchFusedOps()}
    rows = []
    print(f"{'batch':>5} {'native us/layer':>16} {'reference us/layer':>19} {'native/ref':>10} "
          f"{'saved ms/step (x' + str(args.layers) + ')':>22}")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        medians = time_case(implementations, batch_size, dtype, args)
        ratio = medians["native"] / medians["reference"]
        saved_ms = (medians["reference"] - medians["native"]) * args.layers / 1e3
        rows.append({"batch_size": batch_size, "native_us": medians["native"], "reference_us": medians["reference"],
                     "native_over_reference": ratio, "saved_ms_per_step": saved_ms})
        print(f"{batch_size:>5} {medians['native']:>16.1f} {medians['reference']:>19.1f} {ratio:>10.3f} "
              f"{saved_ms:>22.2f}")
    if args.result_file:
        with open(args.result_file, "w") as file:
            json.dump({"dtype": args.dtype, "threads": torch.get_num_threads(), "hidden": args.hidden,
                       "intermediate": args.intermediate, "layers": args.layers,
                       "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}, file, indent=2)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,8", help="rows per layer (default: 1,8)")
    parser.add_argument("--hidden", type=int, default=896, help="hidden size (default: Qwen2-0.5B's 896)")
    parser.add_argument("--intermediate", type=int, default=4864, help="MLP width (default: Qwen2-0.5B's 4864)")
    parser.add_argument("--layers", type=int, default=24, help="layers per step, for the saved-time column (24)")
    parser.add_argument("--runs", type=int, default=200, help="timed layers per implementation per round (200)")
    parser.add_argument("--warmups", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of --runs layers each")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--result-file", default=None, help="write the rows as JSON here")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
