"""Warmup: real prefill steps before serving, so a broken model path or a limit that cannot fit
fails at start-up, not on the first request.

Two kinds, chosen by the backend's `WarmupPolicy`: TGI's one full step of `max_batch_prefill_tokens`
tokens (`full_step`), or a small probe (`probe_prefill_speed`) that also measures how many prompt
tokens per second this machine computes; the probe's memory proof is the analytic peak
(`tgserve.core.step_memory`), checked before the KV cache is sized.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tgserve.core.config import ConfigError
from tgserve.core.invariants import EngineInvariantError
from tgserve.core.limits import RuntimeLimits
from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.scheduler import Scheduler
from tgserve.core.sequence import Sequence

log = logging.getLogger(__name__)

# Every logits processor on, as TGI's warmup request does.
_WARMUP_SAMPLING = SamplingParams(do_sample=True, temperature=0.9, top_k=10, top_p=0.9, typical_p=0.9,
                                  repetition_penalty=1.2, frequency_penalty=0.1, seed=0)
# The probe times a short step (this share of its tokens) and, where that is quick, a full-length one:
# a step costs a fixed part (the head and the sampler of one row, per-layer dispatch) plus a part per
# token, and the short step alone overstates the fixed part's share (measured here, Qwen2-0.5B shape
# bf16: 64 tokens ran at 190 tokens/s, 256 at 410).
_SHORT_STEP_SHARE = 0.25
# The long step runs only when the short one predicts it takes at most this long, so a slow CPU path
# (bf16 widened to fp32 on AVX2: ~15 tokens/s) does not spend half a minute on it.
_MAX_LONG_STEP_S = 3.0


@dataclass(slots=True, frozen=True)
class ProbeResult:
    """What the probe measured (host values, for the start-up log and the default limits)."""

    num_tokens: int  # prompt tokens of the longest timed step (one sequence)
    step_s: float  # seconds that step took
    elapsed_s: float  # seconds of the whole probe, the untimed first step included
    short_tokens: int = 0  # prompt tokens of the short timed step; 0 when only one step was timed
    short_step_s: float = 0.0  # seconds the short timed step took

    @property
    def tokens_per_s(self) -> float:
        """The speed of the longest timed step."""
        return self.num_tokens / max(self.step_s, 1e-9)

    def tokens_per_s_over(self, seconds: float) -> float:
        """The speed of a step that lasts `seconds`: fixed + per-token cost fitted through both timed
        steps; the longest step's speed when there is one step, or the fit is not increasing."""
        if self.short_tokens and self.num_tokens > self.short_tokens:
            per_token_s = (self.step_s - self.short_step_s) / (self.num_tokens - self.short_tokens)
            fixed_s = max(0.0, self.short_step_s - self.short_tokens * per_token_s)
            if per_token_s > 0 and fixed_s < seconds:
                return (seconds - fixed_s) / per_token_s / seconds
        return self.tokens_per_s


def probe_prefill_speed(runner, scheduler: Scheduler, num_tokens: int, top_n_tokens: int,
                        synchronize: Callable[[], object]) -> ProbeResult:
    """Time prefill steps of one sequence: a short one (after the same step untimed, which pays the
    one-time costs: kernel selection, the thread pool, first touch of the activation pages), then
    `num_tokens` when the short one predicts that is quick.

    runner: a `ModelRunner` whose KV cache has the blocks `scheduler` manages (a small scratch cache
    serves); scheduler: idle, with a step budget of at least `num_tokens`. It is idle again on return.
    synchronize: waits for the device (the backend's `tgserve_synchronize`), so a step's time is its whole work.
    """
    short_tokens = max(1, int(num_tokens * _SHORT_STEP_SHARE))
    start_s = time.monotonic()
    _run_step(runner, scheduler, [short_tokens], top_n_tokens, synchronize)
    short_s = _timed_step(runner, scheduler, short_tokens, top_n_tokens, synchronize)
    if short_tokens >= num_tokens or short_s * num_tokens / short_tokens > _MAX_LONG_STEP_S:
        return ProbeResult(num_tokens=short_tokens, step_s=short_s, elapsed_s=time.monotonic() - start_s)
    long_s = _timed_step(runner, scheduler, num_tokens, top_n_tokens, synchronize)
    return ProbeResult(num_tokens=num_tokens, step_s=long_s, elapsed_s=time.monotonic() - start_s,
                       short_tokens=short_tokens, short_step_s=short_s)


def _timed_step(runner, scheduler: Scheduler, num_tokens: int, top_n_tokens: int,
                synchronize: Callable[[], object]) -> float:
    start_s = time.monotonic()
    _run_step(runner, scheduler, [num_tokens], top_n_tokens, synchronize)
    return time.monotonic() - start_s


def full_step(runner, scheduler: Scheduler, limits: RuntimeLimits, top_n_tokens: int,
              synchronize: Callable[[], object]) -> float:
    """TGI's warmup: `max_batch_prefill_tokens` prompt tokens through the model in one step; seconds.

    scheduler: the engine's, still idle (it admits the step's sequences and is idle again on return).
    Raises ConfigError with TGI's message when the step runs out of device memory.
    """
    start_s = time.monotonic()
    num_tokens = _run_step(runner, scheduler, _full_step_lengths(scheduler.blocks.num_free_blocks, limits),
                           top_n_tokens, synchronize)
    elapsed_s = time.monotonic() - start_s
    log.info("Warmup: %d prefill tokens in %.2fs; max_batch_prefill_tokens=%d (one full step, as TGI)",
             num_tokens, elapsed_s, limits.max_batch_prefill_tokens)
    return elapsed_s


def _run_step(runner, scheduler: Scheduler, lengths: list[int], top_n_tokens: int,
              synchronize: Callable[[], object]) -> int:
    """One step prefilling a sequence of each length, as far as the scheduler admits them (free blocks,
    step budget, batch size), finished on the device (`synchronize`); all of them leave the scheduler
    again. Returns the tokens computed."""
    if scheduler.has_work:
        raise EngineInvariantError("warmup needs an idle scheduler")
    added: list[Sequence] = []
    try:
        for num_tokens in lengths:
            request = GenerationRequest(input_ids=_warmup_prompt(len(added), num_tokens), sampling=_WARMUP_SAMPLING,
                                        stopping=StoppingParams(max_new_tokens=1), top_n_tokens=top_n_tokens)
            seq = Sequence(-1 - len(added), request, list(request.input_ids), num_tokens, num_tokens + 1)
            scheduler.add(seq)
            added.append(seq)
        plan = scheduler.schedule()
        try:
            runner.execute(plan)
            synchronize()
        except torch.OutOfMemoryError:
            raise ConfigError(f"Not enough memory to handle {plan.num_tokens} prefill tokens. "
                              "You need to decrease `--max-batch-prefill-tokens`") from None
    finally:
        for seq in added:
            scheduler.finish(seq)
    return plan.num_tokens


def _warmup_prompt(index: int, num_tokens: int) -> list[int]:
    """Token ids 1 and 2 only (in every vocabulary), the first 32 spelling `index` in binary: prompts of one
    step differ within their first block, so none waits for another's blocks (the scheduler holds a request
    whose next prompt block a running one is computing) and the step holds every one of them."""
    bits = [1 + ((index >> k) & 1) for k in range(min(num_tokens, 32))]
    return bits + [1] * (num_tokens - len(bits))


def _full_step_lengths(num_free_blocks: int, limits: RuntimeLimits) -> list[int]:
    """Prompts of up to `max_input_tokens` that add up to `max_batch_prefill_tokens` (as the cache allows)."""
    remaining = min(limits.max_batch_prefill_tokens, (num_free_blocks - 1) * limits.block_size)
    per_request = min(limits.max_input_tokens, remaining)
    lengths = []
    while remaining > 0 and (limits.max_batch_size is None or len(lengths) < limits.max_batch_size):
        lengths.append(min(per_request, remaining))
        remaining -= lengths[-1]
    return lengths
