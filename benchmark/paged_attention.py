"""Per-layer decode attention of the cpu backend: the native paged attention beside the core's torch reference.

  python -m tgserve.benchmark.paged_attention [--dtype bfloat16] [--contexts 48,512] [--batch-sizes 1,8]
                                               [--threads N] [--result-file F]

Qwen2-0.5B's attention shape (14 query heads, 2 KV heads, head_dim 64, blocks of 16) on a random
cache; each decode step (every sequence at the given context, blocks scattered) is built by StepInputs
as the runner builds it and prepared once, then one layer's `forward` (cache write + attention) is
timed. The two run interleaved, `--rounds` times `--runs` calls each, so load from other processes
hits both alike; the table gives each median per call and native / reference. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json

import torch

from tgserve.backends.cpu import plugin
from tgserve.backends.cpu.native_attention import NativePagedAttention
from tgserve.benchmark.interleaved import interleaved_medians
from tgserve.core.layers.attention import TorchPagedAttention
from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.sequence import Sequence
from tgserve.core.step_inputs import StepInputs, step_capacity
from tgserve.core.step_plan import ScheduledSequence, StepPlan

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 14, 2, 64, 16


def decode_batch(batch_size: int, context_len: int, num_blocks: int):
    """A decode step: `batch_size` sequences, each computing its token `context_len`, blocks shuffled."""
    blocks = iter((torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(0)) + 1).tolist())
    plan = StepPlan()
    for index in range(batch_size):
        request = GenerationRequest(list(range(context_len)), SamplingParams(), StoppingParams(max_new_tokens=1))
        seq = Sequence(index, request, list(range(context_len)), context_len, context_len + 1)
        seq.num_computed_tokens = context_len - 1
        seq.block_ids = [next(blocks) for _ in range(-(-context_len // BLOCK_SIZE))]
        plan.scheduled.append(ScheduledSequence(seq, 1))
    inputs = StepInputs(step_capacity(batch_size, batch_size, context_len, num_blocks, BLOCK_SIZE), BLOCK_SIZE,
                        torch.device("cpu"))
    return inputs.prepare(plan)


def time_case(attentions: dict, batch_size: int, context_len: int, dtype: torch.dtype, args) -> dict[str, float]:
    """Median microseconds per layer call of each attention, interleaved rounds."""
    num_blocks = batch_size * -(-context_len // BLOCK_SIZE) + 1
    batch = decode_batch(batch_size, context_len, num_blocks)
    generator = torch.Generator().manual_seed(1)
    qk = torch.randn(batch_size, HEADS + KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
    q, k = qk.split([HEADS, KV_HEADS], dim=1)
    v = torch.randn(batch_size, KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
    metadata = {name: attention.prepare(batch) for name, attention in attentions.items()}

    def call(name: str, attention) -> None:
        batch.attention = metadata[name]
        attention.forward(q, k, v, (cache[0], cache[1]), batch)

    calls = {name: (lambda name=name, attention=attention: call(name, attention))
             for name, attention in attentions.items()}
    return interleaved_medians(calls, args.rounds, args.warmups, args.runs)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ops = plugin.native_attention_ops()
    if ops is None:
        print("the native paged attention is unavailable here (see the log line above)")
        return 1
    attentions = {"native": NativePagedAttention(ops, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE),
                  "reference": TorchPagedAttention(HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE)}
    rows = []
    print(f"{'batch':>5} {'context':>7} {'native us':>10} {'reference us':>13} {'native/ref':>10}")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        for context_len in (int(c) for c in args.contexts.split(",")):
            medians = time_case(attentions, batch_size, context_len, dtype, args)
            ratio = medians["native"] / medians["reference"]
            rows.append({"batch_size": batch_size, "context_len": context_len, "native_us": medians["native"],
                         "reference_us": medians["reference"], "native_over_reference": ratio})
            print(f"{batch_size:>5} {context_len:>7} {medians['native']:>10.1f} {medians['reference']:>13.1f} "
                  f"{ratio:>10.3f}")
    if args.result_file:
        with open(args.result_file, "w") as file:
            json.dump({"dtype": args.dtype, "threads": torch.get_num_threads(), "shape": [HEADS, KV_HEADS, HEAD_DIM],
                       "block_size": BLOCK_SIZE, "rows": rows}, file, indent=2)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    parser.add_argument("--contexts", default="48,512", help="keys per sequence (default: 48,512)")
    parser.add_argument("--batch-sizes", default="1,8", help="decode sequences per step (default: 1,8)")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per attention per round (default: 50)")
    parser.add_argument("--warmups", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of --runs calls per attention")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--result-file", default=None, help="write the rows as JSON here")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
