"""Benchmark: tgserve (a real server process, over HTTP) beside transformers `generate`, same checkpoint.

Prints a table and writes JSON. Measures, for one checkpoint and dtype:
  - decode ms/token at batch 1 (streamed inter-token time for tgserve; generate's marginal token time),
  - time to first token for a 128-token prompt,
  - output tokens/s with 1, 4 and 16 concurrent requests (transformers: one padded batch of that size).

Usage: python benchmarks/engine_vs_transformers.py [--model-dir DIR] [--shape qwen2-0.5b] [--out results.json]
With no --model-dir it writes the random-weight Qwen2-0.5B-shaped checkpoint first (`tgserve demo-model`).
Run it on a quiet machine: the numbers are wall-clock.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

NEW_TOKENS = 64
PROMPT_TOKENS = 128
CONCURRENCY = (1, 4, 16)
REPEATS = 3  # each figure is the median of this many runs: a shared 2-core VM is noisy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompt(num_tokens: int, salt: int) -> str:
    """A prompt that the demo tokenizer turns into roughly `num_tokens` tokens, different per salt."""
    words = ["river", "stone", "light", "garden", "window", "music", "paper", "cloud", "table", "forest"]
    return " ".join(words[(i * 7 + salt) % len(words)] for i in range(num_tokens))


class Server:
    """`tgserve serve` as a child process on a free port."""

    def __init__(self, model_dir: Path, dtype: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tgserve.api.cli", "serve", "--model-id", str(model_dir), "--dtype", dtype,
               "--port", str(self.port), "--hostname", "127.0.0.1", "--max-batch-prefill-tokens", "2048",
               "--max-total-tokens", "1024", "--max-batch-total-tokens", "65536"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("server did not become healthy")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


async def _stream(client: httpx.AsyncClient, url: str, prompt: str, max_new_tokens: int) -> list[float]:
    """Arrival times (perf_counter) of each streamed token of one request, first entry = send time."""
    times = [time.perf_counter()]
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": False}}
    async with client.stream("POST", f"{url}/generate_stream", json=body, timeout=600) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                times.append(time.perf_counter())
    return times


async def _concurrent(url: str, num_requests: int, prompt_tokens: int, new_tokens: int) -> list[list[float]]:
    async with httpx.AsyncClient() as client:
        tasks = [_stream(client, url, _prompt(prompt_tokens, i), new_tokens) for i in range(num_requests)]
        return await asyncio.gather(*tasks)


def bench_tgserve(model_dir: Path, dtype: str) -> dict:
    server = Server(model_dir, dtype)
    try:
        server.wait_ready()
        asyncio.run(_concurrent(server.url, 2, 16, 8))  # warm the HTTP path

        def decode_ms() -> float:
            (times,) = asyncio.run(_concurrent(server.url, 1, 16, NEW_TOKENS))
            return (times[-1] - times[1]) / (len(times) - 2) * 1000

        def ttft_ms() -> float:
            (times,) = asyncio.run(_concurrent(server.url, 1, PROMPT_TOKENS, 1))
            return (times[1] - times[0]) * 1000

        def tokens_per_s(n: int) -> float:
            start = time.perf_counter()
            results = asyncio.run(_concurrent(server.url, n, 16, NEW_TOKENS))
            return sum(len(r) - 1 for r in results) / (time.perf_counter() - start)

        return {"decode_ms_per_token": _median(decode_ms), "ttft_128_ms": _median(ttft_ms),
                "output_tokens_per_s": {n: _median(lambda: tokens_per_s(n)) for n in CONCURRENCY}}
    finally:
        server.stop()


def bench_transformers(model_dir: Path, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()

    def generate(prompts: list[str], new_tokens: int) -> float:
        tokenizer.padding_side = "left"
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start

    generate([_prompt(16, 0)], 4)  # warm up

    def decode_ms() -> float:
        one = generate([_prompt(16, 0)], 1)
        return (generate([_prompt(16, 0)], NEW_TOKENS) - one) / (NEW_TOKENS - 1) * 1000

    def tokens_per_s(n: int) -> float:
        return n * NEW_TOKENS / generate([_prompt(16, i) for i in range(n)], NEW_TOKENS)

    return {"decode_ms_per_token": _median(decode_ms),
            "ttft_128_ms": _median(lambda: generate([_prompt(PROMPT_TOKENS, 0)], 1) * 1000),
            "output_tokens_per_s": {n: _median(lambda: tokens_per_s(n)) for n in CONCURRENCY}}


def _median(measure) -> float:
    """The median of REPEATS calls of `measure`."""
    values = sorted(measure() for _ in range(REPEATS))
    return values[len(values) // 2]


def _table(results: dict) -> str:
    rows = [("decode ms/token, batch 1", "decode_ms_per_token", None),
            (f"TTFT ms, {PROMPT_TOKENS}-token prompt", "ttft_128_ms", None)]
    rows += [(f"output tok/s, {n} concurrent", "output_tokens_per_s", n) for n in CONCURRENCY]
    names = list(results)
    lines = [f"| metric | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for label, key, sub in rows:
        cells = [results[name][key] if sub is None else results[name][key][sub] for name in names]
        lines.append(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--shape", default="qwen2-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("bench-results/engine_vs_transformers.json"))
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = Path(tempfile.gettempdir()) / f"tgserve-bench-{args.shape}"
        if not (model_dir / "config.json").exists():
            subprocess.run([sys.executable, "-m", "tgserve.api.cli", "demo-model", str(model_dir),
                            "--shape", args.shape], check=True)
    results = {"tgserve": bench_tgserve(model_dir, args.dtype)}
    if not args.skip_transformers:
        results["transformers"] = bench_transformers(model_dir, args.dtype)
    print(_table(results))
    if "transformers" in results:
        t, h = results["tgserve"], results["transformers"]
        print(f"batch-1 decode speed-up vs transformers: {h['decode_ms_per_token'] / t['decode_ms_per_token']:.2f}x")
        print(f"16 concurrent vs batch-1 tok/s: {t['output_tokens_per_s'][16] / t['output_tokens_per_s'][1]:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": len(os.sched_getaffinity(0)),
            "model_dir": str(model_dir), "dtype": args.dtype, "date": time.strftime("%Y-%m-%d")}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
