"""Peer runner: llama.cpp through llama-cpp-python's C API, batched greedy decoding on token-id prompts.

Run with the venv `tgserve benchmark peers setup --peers llamacpp` made:
  VENV/bin/python benchmark/peers/llamacpp_runner.py --model-dir DIR --dtype bfloat16
The checkpoint is converted once to GGUF at the run dtype (bf16 / f16 / f32) by the
`convert_hf_to_gguf.py` unpacked from the same llama-cpp-python sdist into VENV/llama.cpp/ (through
gguf_convert.py), and cached in VENV/gguf/. With `--weight-bits 8` / `4` (tgserve ran int8 / int4
weights) that file is then quantized to Q8_0 / Q4_0 by llama.cpp's own `llama_model_quantize` (what
the `llama-quantize` tool calls, with its defaults for the other tensors), cached beside it. Batches use one llama.cpp sequence per prompt in one `llama_decode` per step,
as llama-server does; the sampler is llama.cpp's greedy one. Prints one `TGSERVE_PEER_RESULT` line.
TGSERVE_LLAMACPP_NO_REPACK=1 loads without llama.cpp's extra (AMX / repacked) buffer types: a prebuilt
libllama here died with "Illegal instruction" in its AMX Q8_0 path on a Sapphire Rapids VM.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import peer_protocol as protocol
from gguf_convert import NOTE_MARK

ENGINE = "llama.cpp"
OUTTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
QUANTIZED_TYPES = {8: ("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"), 4: ("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0")}
CONTEXT_ROUNDING = 256  # KV cells per sequence are rounded up to this


class Unavailable(RuntimeError):
    """llama.cpp cannot run this checkpoint here; the message says why."""


def ensure_gguf(model_dir: Path, dtype: str) -> tuple[Path, list[str]]:
    """The GGUF file of `model_dir` at `dtype` and the conversion's notes; converted on first use, cached in the venv."""
    files = sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]
    stamp = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists())
    key = hashlib.sha1(stamp.encode()).hexdigest()[:12]
    out = Path(sys.prefix) / "gguf" / f"{model_dir.name}-{key}-{OUTTYPES[dtype]}.gguf"
    notes_file = out.with_suffix(".notes.json")
    if out.exists():
        return out, json.loads(notes_file.read_text()) if notes_file.exists() else []
    if not (Path(sys.prefix) / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        raise Unavailable(f"no GGUF converter in {Path(sys.prefix) / 'llama.cpp'}: "
                          "run `tgserve benchmark peers setup --peers llamacpp`")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    cmd = [sys.executable, str(Path(__file__).parent / "gguf_convert.py"), str(model_dir), OUTTYPES[dtype], str(partial)]
    print("converting: " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Unavailable(f"convert_hf_to_gguf.py failed on {model_dir}: {proc.stderr.strip()[-1200:]}")
    notes = [line[len(NOTE_MARK):] for line in proc.stderr.splitlines() if line.startswith(NOTE_MARK)]
    notes_file.write_text(json.dumps(notes))
    partial.rename(out)
    return out, notes


def ensure_quantized(llama_cpp, source: Path, bits: int) -> Path:
    """`source` (a float GGUF) quantized to Q8_0 (bits 8) or Q4_0 (bits 4) by llama.cpp; cached beside it."""
    gguf_type, ftype_name = QUANTIZED_TYPES[bits]
    out = source.with_name(f"{source.stem}-{gguf_type}.gguf")
    if out.exists():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = len(os.sched_getaffinity(0))
    partial = out.with_suffix(".partial")
    print(f"quantizing {source} to {gguf_type}", file=sys.stderr, flush=True)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
        partial.unlink(missing_ok=True)
        raise Unavailable(f"llama_model_quantize could not write {gguf_type} from {source}")
    partial.rename(out)
    return out


def open_context(llama_cpp, gguf: Path, max_batch: int, args):
    """Model and context sized for `max_batch` sequences of the workload, on `args.threads` threads."""
    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    if os.environ.get("TGSERVE_LLAMACPP_NO_REPACK"):
        model_params.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), model_params)
    if not model:
        raise Unavailable(f"llama.cpp could not load {gguf}")
    params = llama_cpp.llama_context_default_params()
    per_sequence = -(-(args.sequence_length + args.decode_length) // CONTEXT_ROUNDING) * CONTEXT_ROUNDING
    params.n_ctx = max_batch * per_sequence
    params.n_batch = max_batch * args.sequence_length  # a whole batch's prompts in one llama_decode call
    params.n_seq_max = max_batch
    params.n_threads = params.n_threads_batch = args.threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise Unavailable("llama.cpp could not create a context for this workload")
    vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    return model, ctx, vocab_size


def make_generate(llama_cpp, ctx, max_tokens: int):
    """`generate(prompts, n) -> seconds`: batched prefill, then n - 1 batched decode steps, greedy."""
    batch = llama_cpp.llama_batch_init(max_tokens, 0, 1)
    sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants_logits) for one llama_decode call."""
        for i, (token, pos, seq, wants_logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, wants_logits
        batch.n_tokens = len(entries)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def generate(prompts: list[list[int]], num_new_tokens: int) -> float:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        start_s = time.perf_counter()
        decode([(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)])
        rows = [sum(len(p) for p in prompts[:s + 1]) - 1 for s in range(len(prompts))]  # logits row of each sequence
        for step in range(num_new_tokens):
            tokens = [llama_cpp.llama_sampler_sample(sampler, ctx, row) for row in rows]
            if step == num_new_tokens - 1:
                break
            decode([(tok, len(p) + step, s, True) for s, (tok, p) in enumerate(zip(tokens, prompts))])
            rows = list(range(len(prompts)))
        return time.perf_counter() - start_s

    return generate


def main() -> int:
    args = protocol.parse_args(__doc__.splitlines()[0])
    args.threads = args.threads or len(os.sched_getaffinity(0))
    try:
        import llama_cpp
    except ImportError as error:
        protocol.emit_unavailable(ENGINE, f"llama-cpp-python is not importable in {sys.executable}: {error}")
        return 1
    try:
        gguf, notes = ensure_gguf(Path(args.model_dir), args.dtype)
        if args.weight_bits:
            gguf = ensure_quantized(llama_cpp, gguf, args.weight_bits)
        max_batch = max([1, *args.batch_sizes])
        model, ctx, vocab_size = open_context(llama_cpp, gguf, max_batch, args)
    except Unavailable as error:
        protocol.emit_unavailable(ENGINE, str(error))
        return 1
    generate = make_generate(llama_cpp, ctx, max_batch * args.sequence_length)
    metrics = protocol.measure(generate, vocab_size, args)
    settings = {"threads": args.threads, "gguf": str(gguf), "gguf_type": QUANTIZED_TYPES[args.weight_bits][0] if args.weight_bits else OUTTYPES[args.dtype],
                "gguf_bytes": gguf.stat().st_size,
                "extra_buffer_types": not os.environ.get("TGSERVE_LLAMACPP_NO_REPACK"), "api": "llama_decode, one sequence per prompt, greedy sampler"}
    protocol.emit(ENGINE, llama_cpp.__version__, metrics, settings, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
