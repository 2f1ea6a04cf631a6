"""`tgserve benchmark engine`: prefill and decode latency of the engine itself, no HTTP (TGI's text-generation-benchmark).

For each batch size, each run submits `batch_size` requests of `sequence_length` random prompt
tokens and steps the engine (`Engine.step`: the scheduler's admission, the model runner, the
engine's update) until they finish: one prefill step (batch * sequence_length tokens, which samples
the first token), then `decode_length - 1` decode steps (one token per sequence each). A step's time
is the runner's part of it (`StepStats.forward_s`): the engine's step minus the scheduler's and the
detokenizer's host work. The engine is built and stepped on the calling thread: a second thread
doing torch work gives OpenMP a second pool, measured 30-40% slower on 2 cores.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tgserve.backends.cpu.host import cpu_model_name as cpu_model  # every figure names its machine
from tgserve.benchmark import roofline
from tgserve.benchmark.engine_report import latency_stats, throughput
from tgserve.benchmark.weight_bytes import model_weight_bytes
from tgserve.core.request import ErrorEvent, GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.step_stats import StepStats

PER_SEQUENCE_TOKEN_ROUNDING = 256  # KV budget per sequence is rounded up to this (a multiple of any block size)


@dataclass(slots=True, frozen=True)
class EngineBenchConfig:
    """What one `tgserve benchmark engine` run measures."""

    model_id: str | None  # checkpoint directory or hub id; None = the default model of `tgserve serve` (SmolLM2-135M-Instruct)
    dtype: str | None  # float16 | bfloat16 | float32; None = the backend's default
    batch_sizes: tuple[int, ...]  # sequences per step, one result row each
    sequence_length: int  # prompt tokens per sequence
    decode_length: int  # generated tokens per sequence: 1 from the prefill + decode_length - 1 decode steps
    runs: int  # measured runs per batch size
    warmups: int  # unmeasured runs per batch size, before the measured ones
    backend: str = "auto"
    quantize: str | None = None  # --quantize (TGI's method name); None: the checkpoint's own, or float
    seed: int = 0  # prompt token ids are drawn from this
    bandwidth_probe_bytes: int = 512 << 20  # 0 skips the roofline (no bandwidth probe)

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.sequence_length < 1 or self.decode_length < 2:
            raise ValueError("--sequence-length must be >= 1 and --decode-length >= 2")
        if self.runs < 1 or self.warmups < 0:
            raise ValueError("--runs must be >= 1 and --warmups >= 0")


def server_config(config: EngineBenchConfig):
    """Limits that fit exactly the largest batch: one prefill step of them all, no chunking."""
    from tgserve.core.config import ServerConfig

    max_batch = max(config.batch_sizes)
    total = config.sequence_length + config.decode_length
    per_sequence = -(-total // PER_SEQUENCE_TOKEN_ROUNDING) * PER_SEQUENCE_TOKEN_ROUNDING
    return ServerConfig(model_id=config.model_id, dtype=config.dtype, backend=config.backend, quantize=config.quantize,
                        max_batch_size=max_batch, max_concurrent_requests=max_batch,
                        max_input_tokens=config.sequence_length, max_total_tokens=total,
                        max_batch_prefill_tokens=max_batch * config.sequence_length,
                        max_batch_total_tokens=max_batch * per_sequence)


def build_bench_engine(config: EngineBenchConfig):
    """Build (load, size, warm up) the engine on this thread; it is stepped here too, never started.

    Returns the engine and the selected backend's status (for the device name)."""
    from tgserve.core.engine_builder import build_engine
    from tgserve.core.plugins import BackendRegistry

    server = server_config(config)
    backend = BackendRegistry().select(server.backend)
    return build_engine(server, backend, progress=False), backend.status


class _StepLog:
    """A `StepObserver` that keeps every step's stats, and a sink that keeps error messages."""

    def __init__(self) -> None:
        self.steps: list[StepStats] = []
        self.errors: list[str] = []

    def on_step(self, stats: StepStats) -> None:
        self.steps.append(stats)

    def on_idle(self) -> None:
        pass

    def sink(self, event) -> None:
        if isinstance(event, ErrorEvent):
            self.errors.append(event.message)


def _run(engine, batch_size: int, config: EngineBenchConfig, rng: random.Random) -> tuple[float, list[float]]:
    """Submit `batch_size` requests and step the engine until they finish; the seconds of the prefill
    step and of each decode step. Raises RuntimeError when a step fails or is not the expected shape."""
    log = _StepLog()
    for _ in range(batch_size):
        ids = [rng.randrange(engine.runner.vocab_size) for _ in range(config.sequence_length)]
        stopping = StoppingParams(config.decode_length, ignore_eos_token=True)
        engine.submit(GenerationRequest(ids, SamplingParams(), stopping), log.sink)
    engine.set_observer(log)
    try:
        for _ in range(config.decode_length):
            engine.step()
    finally:
        engine.set_observer(None)
    if log.errors:
        raise RuntimeError(log.errors[0])
    shapes = [(stats.num_seqs, stats.num_tokens) for stats in log.steps]
    expected = ([(batch_size, batch_size * config.sequence_length)]
                + [(batch_size, batch_size)] * (config.decode_length - 1))
    if shapes != expected or engine.num_in_flight:
        raise RuntimeError(f"the engine ran steps of (sequences, tokens) {shapes}, not {expected}")
    return log.steps[0].forward_s, [stats.forward_s for stats in log.steps[1:]]


def run_batch(engine, batch_size: int, config: EngineBenchConfig, rng: random.Random) -> dict:
    """Warm-up and measured runs of one batch size; returns its result row."""
    prefill_s, decode_s, total_s = [], [], []
    for run in range(config.warmups + config.runs):
        prefill, decodes = _run(engine, batch_size, config, rng)
        if run >= config.warmups:
            prefill_s.append(prefill)
            decode_s.extend(decodes)
            total_s.append(prefill + sum(decodes))
    return {
        "batch_size": batch_size, "sequence_length": config.sequence_length, "decode_length": config.decode_length,
        "prefill": {**latency_stats(prefill_s), "tokens_per_s": throughput(batch_size * config.sequence_length, prefill_s)},
        "decode": {**latency_stats(decode_s), "tokens_per_s": throughput(batch_size, decode_s)},
        "decode_total": latency_stats([t - p for t, p in zip(total_s, prefill_s)]),
        "output_tokens_per_s": throughput(batch_size * config.decode_length, total_s),
    }


def add_roofline(report: dict, engine, model_dir: Path, bandwidth_probe_bytes: int) -> None:
    """Measure the read bandwidth on the engine's device and threads; add `roofline`, and the floor
    and `fraction_of_floor` (floor / avg step) to each decode row."""
    import torch

    from tgserve.core.kv_cache import KVCache
    from tgserve.core.model_config import ModelConfig

    model = ModelConfig.from_dir(model_dir)
    itemsize = torch.empty((), dtype=getattr(torch, engine.model_info.model_dtype)).element_size()
    probe = roofline.measure_read_bandwidth(bandwidth_probe_bytes, device=str(engine.runner.device))
    bandwidth = probe["read_bytes_per_s"]
    context = report["meta"]["sequence_length"] + report["meta"]["decode_length"] / 2  # mean cached tokens
    weights = roofline.weight_bytes(roofline.safetensors_numels(model_dir), itemsize, model.tie_word_embeddings)
    if report["meta"].get("quantization"):  # packed weights: the layers' measured bytes, not the checkpoint's
        resident = report["meta"]["weight_bytes"]["total_bytes"]  # the embedding table is gathered, not streamed
        weights = replace(weights, resident_weight_bytes=resident, decode_weight_bytes=resident - weights.embedding_bytes)
    kv_per_token = KVCache.bytes_per_block(model.num_hidden_layers, 1, model.num_key_value_heads, model.head_dim,
                                           getattr(torch, engine.model_info.model_dtype))
    row_bytes = model.hidden_size * itemsize
    report["roofline"] = {**roofline.roofline_summary(weights, kv_per_token, row_bytes, bandwidth, context),
                          "bandwidth_probe": probe}
    for row in report["results"]:
        step_bytes = roofline.decode_step_bytes(weights, row["batch_size"], context, kv_per_token, row_bytes)
        row["decode"]["floor_ms"] = roofline.floor_ms(step_bytes, bandwidth)
        row["decode"]["fraction_of_floor"] = roofline.fraction_of_floor(row["decode"]["floor_ms"],
                                                                        row["decode"]["avg_ms"])


def _meta(engine, device_name: str, model_dir: Path, config: EngineBenchConfig) -> dict:
    import importlib.metadata

    import torch

    return {"tgserve": importlib.metadata.version("tgserve"), "torch": torch.__version__,
            "device_name": device_name, "cpu_model": cpu_model(), "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "model_id": engine.model_info.model_id,
            "model_dir": str(model_dir), "dtype": engine.model_info.model_dtype, "backend": engine.model_info.backend,
            "device": str(engine.runner.device), "quantization": engine.model_info.quantization,
            "weight_bytes": model_weight_bytes(engine.runner.model), "sequence_length": config.sequence_length,
            "decode_length": config.decode_length, "runs": config.runs, "warmups": config.warmups}


def run_engine_bench(config: EngineBenchConfig) -> dict:
    """The whole benchmark: build the engine, run every batch size, add the roofline; a JSON-able dict."""
    from tgserve.core.engine_builder import resolve_source

    load_before = os.getloadavg()[0]  # others' work on the machine; the figures mean little when it is high
    engine, status = build_bench_engine(config)
    try:
        model_dir = resolve_source(engine.config).path
        report = {"meta": {**_meta(engine, status.device_name, model_dir, config), "load_avg_1m_before": load_before},
                  "config": asdict(config), "roofline": None}
        rng = random.Random(config.seed)
        report["results"] = [run_batch(engine, b, config, rng) for b in config.batch_sizes]
        if config.bandwidth_probe_bytes > 0:
            add_roofline(report, engine, model_dir, config.bandwidth_probe_bytes)
    finally:
        engine.shutdown(drain_timeout_s=0)  # never started: this only calls the backend's shutdown hook
    return report
