"""Peer runner: Hugging Face transformers `generate`, in-process, greedy, on token-id prompts.

Run with any python that has torch and transformers (the tgserve environment does):
  python benchmark/peers/transformers_runner.py --model-dir DIR --dtype bfloat16
Prints one `TGSERVE_PEER_RESULT {json}` line (see peer_protocol.py).
"""
from __future__ import annotations

import os
import sys
import time

import peer_protocol as protocol

ENGINE = "transformers"


def main() -> int:
    args = protocol.parse_args(__doc__.splitlines()[0])
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as error:
        protocol.emit_unavailable(ENGINE, f"cannot import torch/transformers in {sys.executable}: {error}")
        return 1
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).eval()

    def generate(prompts: list[list[int]], num_new_tokens: int) -> float:
        input_ids = torch.tensor(prompts, dtype=torch.int64)
        start_s = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           max_new_tokens=num_new_tokens, min_new_tokens=num_new_tokens, do_sample=False,
                           pad_token_id=0)
        return time.perf_counter() - start_s

    metrics = protocol.measure(generate, model.config.vocab_size, args)
    settings = {"threads": threads, "dtype": args.dtype, "torch": torch.__version__, "api": "generate, default cache"}
    protocol.emit(ENGINE, transformers.__version__, metrics, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
