"""The model `tgserve benchmark quality` scores: built by the real start-up path, run teacher-forced.

`build_quality_engine` calls `build_engine` (the backend's hooks, `--quantize` through
`tgserve_make_linear_method`, weight loading, KV-cache sizing, warm-up) with limits that fit one
window. `position_logits` then runs one prefill of a single sequence through that engine's own runner
parts (step inputs, attention metadata, model, KV cache) and keeps the logits of every position,
which the serving path never materialises (its prompt logprobs give only the chosen token's). The
engine is never started: everything runs on the calling thread, as `benchmark engine` does.
"""
from __future__ import annotations

import torch

from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.sequence import Sequence
from tgserve.core.step_plan import ScheduledSequence, StepPlan

PER_SEQUENCE_TOKEN_ROUNDING = 256  # the KV budget is rounded up to this (a multiple of any block size)
_RUNNER_PARTS = ("model", "kv_cache", "inputs", "attention")  # what the core's ModelRunner holds


def build_quality_engine(model_id: str | None, dtype: str, quantize: str | None, backend: str, window: int):
    """The engine for one method (not started), sized for one sequence of `window` tokens in one step.

    Raises what `build_engine` raises (ConfigError and its QuantizationError, BackendUnavailable,
    OSError) and ValueError when the backend's model runner is not the core's kind."""
    from tgserve.core.config import ServerConfig
    from tgserve.core.engine_builder import build_engine
    from tgserve.core.plugins import BackendRegistry

    kv_tokens = -(-(window + 1) // PER_SEQUENCE_TOKEN_ROUNDING) * PER_SEQUENCE_TOKEN_ROUNDING
    config = ServerConfig(model_id=model_id, dtype=dtype, quantize=quantize, backend=backend, max_batch_size=1,
                          max_concurrent_requests=1, max_input_tokens=window, max_total_tokens=window + 1,
                          max_batch_prefill_tokens=window, max_batch_total_tokens=kv_tokens)
    engine = build_engine(config, BackendRegistry().select(config.backend), progress=False)
    missing = [part for part in _RUNNER_PARTS if not hasattr(engine.runner, part)]
    if missing:
        engine.shutdown(drain_timeout_s=0)
        raise ValueError(f"backend {engine.model_info.backend}'s model runner has no {', '.join(missing)}: "
                         "teacher-forced scoring needs the core's ModelRunner")
    return engine


@torch.inference_mode()
def position_logits(engine, token_ids: list[int]) -> torch.Tensor:
    """float32 logits [len(token_ids), vocab]: row j is the model's prediction after token j.

    One prefill step of one sequence on the engine's runner, its KV blocks taken from and given back
    to the engine's block manager (the engine must be idle)."""
    runner, blocks = engine.runner, engine.scheduler.blocks
    num_tokens = len(token_ids)
    request = GenerationRequest(list(token_ids), SamplingParams(), StoppingParams(max_new_tokens=1))
    seq = Sequence(request_id=-1, request=request, token_ids=list(token_ids), num_prompt_tokens=num_tokens,
                   max_tokens=num_tokens + 1)
    seq.block_ids = blocks.allocate(blocks.blocks_for(num_tokens))
    try:
        plan = StepPlan([ScheduledSequence(seq, num_tokens)], max_block_id=blocks.max_block_id)
        runner.kv_cache.initialize_blocks(plan.max_block_id)
        batch = runner.inputs.prepare(plan)
        batch.attention = runner.attention.prepare(batch)
        hidden = runner.model.forward(batch, runner.kv_cache)
        return runner.model.compute_logits(hidden[:num_tokens]).float()
    finally:
        blocks.free(seq.block_ids)
