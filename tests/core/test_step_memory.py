"""The analytic step peak (what start-up checks instead of a full-size warmup on CPU) bounds what a
real prefill step takes, measured as the growth of the process's peak resident memory."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tgserve.core.block_manager import BlockManager
from tgserve.core.distributed.tensor_parallel import TensorParallel
from tgserve.core.model_config import ModelConfig
from tgserve.core.model_runner import ModelRunner
from tgserve.core.plugins import BackendRegistry
from tgserve.core.scheduler import Scheduler
from tgserve.core.step_inputs import step_capacity
from tgserve.core.step_memory import step_memory
from tgserve.core.warmup import _run_step

CLEAR_REFS = Path("/proc/self/clear_refs")
STEP_TOKENS = 2048
# Wide enough layers that the activations (~130 MB at 2048 tokens) dwarf allocator noise.
DIMS = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=False)


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{key} missing from /proc/self/status")


def _reset_peak_rss() -> None:
    CLEAR_REFS.write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def _build_runner():
    torch.manual_seed(0)
    hf_config = Qwen2Config(**DIMS)
    state = Qwen2ForCausalLM(hf_config).state_dict()
    model_config = ModelConfig.from_dict({**hf_config.to_dict(), "model_type": "qwen2"})
    hook, device, dtype = BackendRegistry().select("cpu").hook, torch.device("cpu"), torch.float32
    attention = hook.tgserve_make_attention(model_config=model_config, block_size=16, device=device, dtype=dtype)
    model = hook.tgserve_make_model(
        model_config=model_config, device=device, dtype=dtype, attention=attention,
        tensor_parallel=TensorParallel.single(), fused_ops=hook.tgserve_make_fused_ops(dtype=dtype, device=device),
        linear_method=hook.tgserve_make_linear_method(quantize=None, quantization=None, dtype=dtype, device=device))
    model.load_weights(state.items())
    blocks = BlockManager(STEP_TOKENS // 16 + 2, 16)
    kv_cache = hook.tgserve_make_kv_cache(num_blocks=blocks.num_blocks, block_size=16, model_config=model_config,
                                          device=device, dtype=dtype)
    scheduler = Scheduler(blocks, max_batch_prefill_tokens=STEP_TOKENS, max_batch_size=1)
    inputs = hook.tgserve_make_step_inputs(capacity=step_capacity(STEP_TOKENS, 1, STEP_TOKENS + 1, blocks.num_blocks, 16),
                                           block_size=16, constraints=None, device=device)
    return ModelRunner(model, kv_cache, attention, device, model_config.vocab_size, inputs), scheduler, model_config


def measure_step_peak_bytes() -> int:
    """Peak RSS growth over one STEP_TOKENS prefill step, after a small step paid the one-time costs."""
    runner, scheduler, _ = _build_runner()
    _run_step(runner, scheduler, [16], top_n_tokens=5, synchronize=lambda: None)
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    _run_step(runner, scheduler, [STEP_TOKENS], top_n_tokens=5, synchronize=lambda: None)
    return _status_bytes("VmHWM") - before


def test_analytic_peak_bounds_a_real_prefill_step():
    try:
        _reset_peak_rss()
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    # A fresh process: in this one, memory that earlier tests freed but the allocator kept would
    # serve the step without any growth of the resident set.
    code = "from tests.core.test_step_memory import measure_step_peak_bytes as m; print(m())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    measured = int(result.stdout.split()[-1])
    model_config = ModelConfig.from_dict({**Qwen2Config(**DIMS).to_dict(), "model_type": "qwen2"})
    estimate = step_memory(model_config, torch.float32, STEP_TOKENS, STEP_TOKENS, num_sampling_rows=1)
    assert measured <= estimate.total_bytes, (measured, estimate)
    assert estimate.total_bytes <= 3 * measured, "so conservative that it would refuse limits that fit"
