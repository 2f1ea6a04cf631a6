"""Warmup kinds: the backend's policy, the CPU probe (two real steps, the second timed) and TGI's full step."""
from __future__ import annotations

import re

import pytest
import torch

from tgserve.core import default_plugin
from tgserve.core.block_manager import BlockManager
from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.limits import RuntimeLimits
from tgserve.core.plugins import BackendRegistry
from tgserve.core.warmup import full_step, probe_prefill_speed
from tgserve.core.warmup_policy import WarmupPolicy


class FakeRunner:
    """Records each step's prompt lengths and the blocks its sequences held."""

    def __init__(self, error: Exception | None = None):
        self.steps: list[list[int]] = []
        self.block_ids: list[list[int]] = []
        self.error = error

    def execute(self, plan):
        self.steps.append([item.num_new_tokens for item in plan.scheduled])
        self.block_ids.append([b for item in plan.scheduled for b in item.seq.block_ids])
        if self.error is not None:
            raise self.error


def _limits(**values) -> RuntimeLimits:
    base = dict(max_input_tokens=100, max_total_tokens=200, max_batch_prefill_tokens=250,
                max_batch_total_tokens=4096, max_batch_size=None, num_blocks=257, block_size=16)
    return RuntimeLimits(**{**base, **values})


def test_cpu_probes_and_budgets_4_gib_while_the_core_default_is_tgis_full_step():
    cpu = BackendRegistry().select("cpu").hook
    assert cpu.tgserve_get_default_kv_cache_bytes(device=torch.device("cpu")) == 4 * 2**30  # vLLM-CPU's default
    policy = cpu.tgserve_get_warmup_policy(model_config=None, config=ServerConfig())
    assert not policy.is_full_step and policy.probe_tokens >= 2 and policy.prefill_step_s > 0
    assert default_plugin.tgserve_get_warmup_policy(model_config=None, config=ServerConfig()).is_full_step


@pytest.mark.parametrize("values", [dict(probe_tokens=1), dict(probe_tokens=64, prefill_step_s=0.0)])
def test_policy_rejects_values_that_measure_nothing(values):
    with pytest.raises(ValueError):
        WarmupPolicy(**values)


def test_probe_runs_a_short_untimed_step_then_the_timed_one_and_frees_its_blocks():
    runner, blocks = FakeRunner(), BlockManager(6, 16)
    result = probe_prefill_speed(runner, blocks, 64, top_n_tokens=5)
    assert runner.steps == [[16], [64]]
    assert len(runner.block_ids[1]) == 5  # 64 prompt tokens + the sampled one, in blocks of 16
    assert blocks.num_free_blocks == 5
    assert result.num_tokens == 64 and 0 <= result.step_s <= result.elapsed_s
    assert result.tokens_per_s == pytest.approx(64 / max(result.step_s, 1e-9))


def test_full_step_fills_the_prefill_budget_with_prompts_of_at_most_max_input_tokens():
    runner, blocks = FakeRunner(), BlockManager(257, 16)
    full_step(runner, blocks, _limits(), top_n_tokens=5)
    assert runner.steps == [[100, 100, 50]]
    assert blocks.num_free_blocks == 256
    full_step(runner, blocks, _limits(max_batch_size=2), top_n_tokens=5)
    assert runner.steps[-1] == [100, 100]


def test_full_step_out_of_memory_is_tgis_message():
    runner = FakeRunner(torch.OutOfMemoryError("CUDA out of memory"))
    blocks = BlockManager(257, 16)
    with pytest.raises(ConfigError, match=re.escape(
            "Not enough memory to handle 250 prefill tokens. You need to decrease `--max-batch-prefill-tokens`")):
        full_step(runner, blocks, _limits(), top_n_tokens=5)
    assert blocks.num_free_blocks == 256
