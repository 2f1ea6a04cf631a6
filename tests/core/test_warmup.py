"""Warmup kinds: the backend's policy, the CPU probe (a warm short step, then a full one, both timed) and TGI's full step."""
from __future__ import annotations

import re
import time

import pytest
import torch

from tgserve.core import default_plugin
from tgserve.core.block_manager import BlockManager
from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.limits import RuntimeLimits
from tgserve.core.plugins import BackendRegistry
from tgserve.core.scheduler import Scheduler
from tgserve.core.warmup import ProbeResult, full_step, probe_prefill_speed
from tgserve.core.warmup_policy import WarmupPolicy


class FakeRunner:
    """Records each step's prompt lengths and the blocks its sequences held. Like a GPU, it only queues
    a step: the step's time (`delay_s`) passes when `synchronize` waits for it."""

    def __init__(self, error: Exception | None = None, delay_s: float = 0.0):
        self.steps: list[list[int]] = []
        self.block_ids: list[list[int]] = []
        self.error = error
        self.delay_s = delay_s  # each step lasts at least this long
        self.num_queued = 0  # steps executed and not yet waited for

    def synchronize(self) -> bool:
        time.sleep(self.delay_s * self.num_queued)
        self.num_queued = 0
        return True

    def execute(self, plan):
        self.num_queued += 1
        self.steps.append([item.num_new_tokens for item in plan.scheduled])
        self.block_ids.append([b for item in plan.scheduled for b in item.seq.block_ids])
        if self.error is not None:
            raise self.error


def _scheduler(num_blocks: int, max_step_tokens: int, max_batch_size: int | None = None) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 16), max_step_tokens, max_batch_size)


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


def test_probe_times_the_short_step_warm_then_the_full_one_and_frees_its_blocks():
    runner, scheduler = FakeRunner(), _scheduler(6, 64, 1)
    result = probe_prefill_speed(runner, scheduler, 64, top_n_tokens=5, synchronize=runner.synchronize)
    assert runner.steps == [[16], [16], [64]]  # untimed, timed short, timed full
    assert len(runner.block_ids[2]) == 5  # 64 prompt tokens + the sampled one, in blocks of 16
    assert scheduler.blocks.num_free_blocks == 5 and not scheduler.has_work
    assert (result.num_tokens, result.short_tokens) == (64, 16)
    assert 0 <= result.short_step_s and 0 <= result.step_s <= result.elapsed_s
    assert result.tokens_per_s == pytest.approx(64 / max(result.step_s, 1e-9))


def test_probe_skips_the_full_step_where_the_short_one_predicts_it_is_slow():
    runner, scheduler = FakeRunner(delay_s=0.8), _scheduler(6, 64, 1)  # 16 tokens in 0.8 s: 64 would take 3.2 s
    result = probe_prefill_speed(runner, scheduler, 64, top_n_tokens=5, synchronize=runner.synchronize)
    assert runner.steps == [[16], [16]]  # the short step's time counts only if warmup waits for the device
    assert (result.num_tokens, result.short_tokens) == (16, 0) and runner.num_queued == 0


def test_speed_over_a_step_fits_a_fixed_and_a_per_token_cost():
    # 0.1 s fixed + 1 ms per token: 64 tokens in 0.164 s, 256 in 0.356 s; a 1 s step holds 900 tokens.
    result = ProbeResult(num_tokens=256, step_s=0.356, elapsed_s=1.0, short_tokens=64, short_step_s=0.164)
    assert result.tokens_per_s_over(1.0) == pytest.approx(900.0)
    assert result.tokens_per_s == pytest.approx(256 / 0.356)  # the long step alone would say 719
    one_step = ProbeResult(num_tokens=64, step_s=0.5, elapsed_s=1.0)
    assert one_step.tokens_per_s_over(1.0) == pytest.approx(128.0)
    noisy = ProbeResult(num_tokens=256, step_s=0.2, elapsed_s=1.0, short_tokens=64, short_step_s=0.3)
    assert noisy.tokens_per_s_over(1.0) == pytest.approx(256 / 0.2)  # no increasing fit: the long step's speed


def test_full_step_fills_the_prefill_budget_with_prompts_of_at_most_max_input_tokens():
    runner, scheduler = FakeRunner(), _scheduler(257, 250)
    full_step(runner, scheduler, _limits(), top_n_tokens=5, synchronize=runner.synchronize)
    assert sorted(runner.steps[0]) == [50, 100, 100] and len(runner.steps) == 1  # one step, shortest prompt first
    assert scheduler.blocks.num_free_blocks == 256 and not scheduler.has_work
    scheduler = _scheduler(257, 250, max_batch_size=2)
    full_step(runner, scheduler, _limits(max_batch_size=2), top_n_tokens=5, synchronize=runner.synchronize)
    assert runner.steps[-1] == [100, 100]


def test_full_step_out_of_memory_is_tgis_message():
    runner = FakeRunner(torch.OutOfMemoryError("CUDA out of memory"))
    scheduler = _scheduler(257, 250)
    with pytest.raises(ConfigError, match=re.escape(
            "Not enough memory to handle 250 prefill tokens. You need to decrease `--max-batch-prefill-tokens`")):
        full_step(runner, scheduler, _limits(), top_n_tokens=5, synchronize=runner.synchronize)
    assert scheduler.blocks.num_free_blocks == 256 and not scheduler.has_work
