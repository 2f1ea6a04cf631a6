"""Warmup: one full-size step before serving, so a limit that cannot fit fails at start-up, not later."""
from __future__ import annotations

import logging
import time

import torch

from tgserve.core.batch import ScheduledSequence, StepPlan
from tgserve.core.config import ConfigError
from tgserve.core.limits import RuntimeLimits
from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.scheduler import Scheduler
from tgserve.core.sequence import Sequence

log = logging.getLogger(__name__)

# Every logits processor on, as TGI's warmup request does.
_WARMUP_SAMPLING = SamplingParams(do_sample=True, temperature=0.9, top_k=10, top_p=0.9, typical_p=0.9,
                                  repetition_penalty=1.2, frequency_penalty=0.1, seed=0)


def warmup(runner, scheduler: Scheduler, limits: RuntimeLimits, top_n_tokens: int) -> float:
    """Run `max_batch_prefill_tokens` prompt tokens through the model in one step; returns seconds.

    Raises ConfigError with TGI's message when the step runs out of memory.
    """
    plan, seqs = _warmup_plan(scheduler, limits, top_n_tokens)
    start_s = time.monotonic()
    try:
        runner.execute(plan)
    except torch.OutOfMemoryError:
        raise ConfigError(f"Not enough memory to handle {plan.num_tokens} prefill tokens. "
                          "You need to decrease `--max-batch-prefill-tokens`") from None
    finally:
        for seq in seqs:
            scheduler.blocks.free(seq.block_ids)
    elapsed_s = time.monotonic() - start_s
    log.info("Warmup: %d prefill tokens in %.2fs", plan.num_tokens, elapsed_s)
    return elapsed_s


def _warmup_plan(scheduler: Scheduler, limits: RuntimeLimits, top_n_tokens: int):
    plan, seqs = StepPlan(), []
    remaining = min(limits.max_batch_prefill_tokens, (scheduler.blocks.num_free_blocks - 1) * limits.block_size)
    per_request = min(limits.max_input_tokens, remaining)
    while remaining > 0 and (limits.max_batch_size is None or len(seqs) < limits.max_batch_size):
        num_tokens = min(per_request, remaining)
        request = GenerationRequest(input_ids=[1] * num_tokens, sampling=_WARMUP_SAMPLING,
                                    stopping=StoppingParams(max_new_tokens=1), top_n_tokens=top_n_tokens)
        seq = Sequence(-1 - len(seqs), request, list(request.input_ids), num_tokens, num_tokens + 1)
        num_blocks = scheduler.blocks.blocks_for(num_tokens + 1)
        if not scheduler.blocks.can_allocate(num_blocks):
            break
        seq.block_ids = scheduler.blocks.allocate(num_blocks)
        seqs.append(seq)
        plan.scheduled.append(ScheduledSequence(seq, num_tokens))
        remaining -= num_tokens
    return plan, seqs
