"""Start-up: from a `ServerConfig` and the selected backend to a warmed-up `Engine`.

Order, as TGI's launcher and shard: resolve the checkpoint, build the model through the backend's
hooks, load weights, (on a backend that probes instead of TGI's full warmup step) time a small real
prefill step to derive the default `max_batch_prefill_tokens`, check that one step's analytic peak
fits, size the KV cache from the memory the backend reports, derive the limits, warm up, then hand
the backend the ready model.

On a sharded server (`--num-shard N`) this runs on rank 0 with a `Ranks` context: the model is built
on rank 0's shard, its attention and KV caches see the rank's own heads, and every step the runners
take (the probe's, warmup's and serving's) and every KV cache they allocate is broadcast to the other
ranks, whose loop (`tgserve.core.distributed.shard_worker`) builds the same shard through
`model_loading.load_shard` and mirrors them.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from tgserve.core.block_manager import BlockManager
from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.distributed.ranks import Ranks
from tgserve.core.distributed.tensor_parallel import TensorParallel
from tgserve.core.engine import Engine
from tgserve.core.grammar import GrammarCompiler, grammar_tokenizer_for
from tgserve.core.kv_cache import KVCache
from tgserve.core.limits import RuntimeLimits
from tgserve.core.limits_derivation import (DEFAULT_MAX_BATCH_PREFILL_TOKENS, check_step_fits, derive_limits,
                                            max_context_bound, num_kv_blocks, prefill_tokens_for_speed, usable_bytes)
from tgserve.core.model_loading import (DEMO_MODEL_ID, LoadedModel, load_model, make_kv_cache, open_target,
                                        resolve_source)
from tgserve.core.model_runner import ModelRunner
from tgserve.core.plugins import ActiveBackend
from tgserve.core.quantization.quant_config import resolve_quantization
from tgserve.core.request import ModelInfo
from tgserve.core.scheduler import Scheduler
from tgserve.core.shape_constraints import ShapeConstraints
from tgserve.core.speculation import make_proposer
from tgserve.core.speculation.adaptive import AdaptiveProposer, knee_rows_from_probe
from tgserve.core.speculation.medusa_heads import MedusaHeads
from tgserve.core.speculation.acceptance import Proposer
from tgserve.core.speculation.draft import DraftProposer
from tgserve.core.speculation.draft_checkpoint import open_draft
from tgserve.core.step_inputs import StepCapacity, step_capacity
from tgserve.core.step_memory import StepMemory, step_memory
from tgserve.core.tokenizer import Tokenizer
from tgserve.core.warmup import ProbeResult, full_step, probe_prefill_speed
from tgserve.core.warmup_policy import WarmupPolicy

log = logging.getLogger(__name__)
_MIB = 2**20


@dataclass(slots=True, frozen=True)
class _Sizing:
    """The KV cache and limits start-up settled on, and the memory figures behind them (for the log)."""

    num_blocks: int
    limits: RuntimeLimits
    kv_cache_bytes: int  # num_blocks blocks, all layers, K and V
    step: StepMemory  # analytic peak of one step at the `max_batch_prefill_tokens` it was checked for
    usable_bytes: int  # the share of the backend's free memory the step and the cache may take


def build_engine(config: ServerConfig, backend: ActiveBackend, progress: bool = True,
                 ranks: Ranks | None = None) -> Engine:
    """Load, size, warm up and return an engine (not started). Raises ConfigError on bad limits.

    ranks: rank 0's context on a sharded server (the other ranks already run their loop); None: one rank."""
    hook = backend.hook
    hook.tgserve_on_startup(config=config)
    target = open_target(config, hook)
    config, medusa, model_config, quantization = target.config, target.medusa, target.model_config, target.quantization
    tp = ranks.tp if ranks is not None else TensorParallel.single()
    if tp.world_size > 1 and medusa is not None:
        raise ConfigError(f"--num-shard does not combine with Medusa heads ({target.model_id}) yet: "
                          "serve its base model sharded, or the heads on one rank")
    tokenizer = target.checkpoint.tokenizer(model_config.eos_token_ids, config.trust_remote_code)
    dtype_name = target.dtype_name
    log.info("Loading %s (%s) on %s as %s%s", target.model_id, model_config.model_type, backend.name, dtype_name,
             f", weights quantized with {quantization.describe()}" if quantization else "")
    loaded = load_model(quantization, hook, target.checkpoint, model_config, getattr(torch, dtype_name), progress,
                         tp, ranks)
    constraints = hook.tgserve_get_shape_constraints(model_config=model_config, config=config)
    proposer = make_proposer(config.speculate, constraints, backend.name, medusa)
    draft = _load_draft(config, hook, loaded, tokenizer, progress) if config.speculative_model else None
    policy: WarmupPolicy = hook.tgserve_get_warmup_policy(model_config=model_config, config=config)
    probe = None if policy.is_full_step else _probe(config, hook, loaded, policy, constraints)
    step_s = policy.prefill_step_s
    default_prefill = (DEFAULT_MAX_BATCH_PREFILL_TOKENS if probe is None
                       else prefill_tokens_for_speed(probe.tokens_per_s_over(step_s), step_s))
    sizing = _size(config, hook, loaded, tokenizer.model_max_length, constraints, default_prefill,
                   logits_per_row=1 + (config.speculate if medusa else 0), draft=draft)
    limits = sizing.limits
    log.info("KV-cache blocks: %d, size: %d (%d MiB)", sizing.num_blocks, loaded.block_size,
             sizing.kv_cache_bytes // _MIB)
    log.info("Setting max batch total tokens to %d", limits.max_batch_total_tokens)
    kv_cache = make_kv_cache(hook, loaded, sizing.num_blocks)
    capacity = step_capacity(limits.max_batch_prefill_tokens, limits.max_batch_size, limits.max_total_tokens,
                             sizing.num_blocks, loaded.block_size, constraints)
    runner = _runner(config, hook, loaded, kv_cache, capacity, constraints)
    if medusa is not None and config.speculate:
        runner.heads = MedusaHeads.load(medusa, config.speculate, loaded.dtype, loaded.device,
                                        (model_config.hidden_size, model_config.vocab_size))
    if draft is not None:
        proposer = _draft_proposer(config, hook, draft, sizing.num_blocks, capacity, constraints)
    if proposer is not None:
        log.info("Using speculation %s with %d input ids.", proposer.method, config.speculate)  # TGI's line
    is_prefix_caching = config.prefix_caching and (constraints is None or (
        constraints.supports_prefix_caching and not constraints.is_slot_based))
    log.info("Prefix caching: %s", "on (--prefix-caching false turns it off)" if is_prefix_caching else
             "off" + ("" if config.prefix_caching else " (--prefix-caching false)"))
    scheduler = Scheduler(BlockManager(sizing.num_blocks, loaded.block_size, is_prefix_caching),
                          limits.max_batch_prefill_tokens,
                          limits.max_batch_size, constraints.supports_chunked_prefill if constraints else True,
                          constraints)
    if probe is None:
        full_step(runner, scheduler, limits, config.max_top_n_tokens, _synchronizer(hook, loaded))
    else:
        _log_probe(config, probe, policy, sizing, backend.name)
    hook.tgserve_on_model_ready(model=loaded.model, kv_cache=kv_cache, limits=limits)
    if proposer is not None:  # lengths follow each sequence's acceptance and the batch's size
        proposer = AdaptiveProposer(proposer, knee_rows_from_probe(probe))
    info = ModelInfo(model_id=target.model_id, model_sha=target.sha, model_dtype=dtype_name,
                     model_device_type=loaded.device.type, backend=backend.name,
                     eos_token_ids=tokenizer.eos_token_ids,
                     quantization=quantization.as_info() if quantization else None, num_shard=tp.world_size)
    engine = Engine(config, limits, info, tokenizer, scheduler, runner, on_shutdown=_shutdown(hook, ranks, loaded),
                    proposer=proposer, collective_clock=tp.clock if tp.world_size > 1 else None)
    if not config.disable_grammar_support:
        engine.grammar_compiler = _grammar_compiler(tokenizer, model_config.vocab_size, config.grammar_compile_timeout)
    return engine


def _grammar_compiler(tokenizer: Tokenizer, num_logits: int, max_compile_s: float) -> GrammarCompiler:
    """The grammar compile cache over llguidance's view of the tokenizer (its token trie, built once here)."""
    started_s = time.perf_counter()
    grammar_tokenizer = grammar_tokenizer_for(tokenizer.hf, num_logits, tokenizer.eos_token_ids)
    log.info("Grammar support: token trie of %d ids built in %.2fs (--disable-grammar-support skips it)",
             num_logits, time.perf_counter() - started_s)
    return GrammarCompiler(grammar_tokenizer, max_compile_s=max_compile_s)


def _shutdown(hook, ranks: Ranks | None, loaded: LoadedModel):
    """The engine's last call: on a sharded server the other ranks are told to stop first."""
    if ranks is None:
        return hook.tgserve_on_shutdown

    def shutdown() -> None:
        ranks.on_stopping()  # their exits are expected from here on
        loaded.broadcast.send_shutdown()
        hook.tgserve_on_shutdown()
    return shutdown


def _load_draft(config: ServerConfig, hook, loaded: LoadedModel, tokenizer, progress: bool) -> LoadedModel:
    """The --speculative-model on the target's device and dtype, through the same hooks (its vocabulary
    checked first: ConfigError where it differs)."""
    draft = open_draft(config, loaded.model_config, tokenizer)
    quantization = resolve_quantization(None, draft.checkpoint.raw_config)
    log.info("Loading speculation draft %s (%s, %d layers)", draft.model_id, draft.model_config.model_type,
             draft.model_config.num_hidden_layers)
    return load_model(quantization, hook, draft.checkpoint, draft.model_config, loaded.dtype, progress)


def _draft_proposer(config: ServerConfig, hook, draft: LoadedModel, num_blocks: int, capacity: StepCapacity,
                    constraints: ShapeConstraints | None) -> Proposer:
    """The draft's proposer: its KV cache indexed by the target's block ids, its own step inputs."""
    kv_cache = make_kv_cache(hook, draft, num_blocks)
    inputs = hook.tgserve_make_step_inputs(capacity=capacity, block_size=draft.block_size, constraints=constraints,
                                           device=draft.device)
    return DraftProposer(draft.model, draft.attention, kv_cache, inputs, draft.device, config.speculate,
                         capacity.max_num_tokens, capacity.max_num_seqs)


def _runner(config: ServerConfig, hook, loaded: LoadedModel, kv_cache, capacity: StepCapacity,
            constraints: ShapeConstraints | None) -> ModelRunner:
    """The backend's step inputs and model runner (the core's unless the backend supplies its own)."""
    inputs = hook.tgserve_make_step_inputs(capacity=capacity, block_size=loaded.block_size, constraints=constraints,
                                           device=loaded.device)
    runner = hook.tgserve_make_model_runner(model=loaded.model, kv_cache=kv_cache, attention=loaded.attention,
                                            step_inputs=inputs, device=loaded.device,
                                            vocab_size=loaded.model_config.vocab_size, config=config)
    if loaded.broadcast is not None:
        runner.step_broadcast = loaded.broadcast
    return runner


def _probe(config: ServerConfig, hook, loaded: LoadedModel, policy: WarmupPolicy,
           constraints: ShapeConstraints | None) -> ProbeResult:
    """Time the policy's probe step on a scratch KV cache just big enough for it (freed on return)."""
    num_tokens = min(policy.probe_tokens, loaded.model_config.max_position_embeddings - 1)
    blocks = BlockManager(-(-(num_tokens + 1) // loaded.block_size) + 1, loaded.block_size, is_prefix_caching=False)
    scratch = make_kv_cache(hook, loaded, blocks.num_blocks)
    scheduler = Scheduler(blocks, max_batch_prefill_tokens=num_tokens, max_batch_size=1, constraints=constraints)
    capacity = step_capacity(num_tokens, 1, num_tokens + 1, blocks.num_blocks, loaded.block_size, constraints)
    return probe_prefill_speed(_runner(config, hook, loaded, scratch, capacity, constraints), scheduler, num_tokens,
                               config.max_top_n_tokens, _synchronizer(hook, loaded))


def _synchronizer(hook, loaded: LoadedModel):
    """Waits for the device to finish queued work (warmup times whole steps)."""
    return lambda: hook.tgserve_synchronize(device=loaded.device)


def _size(config: ServerConfig, hook, loaded: LoadedModel, model_max_length: int | None, constraints,
          default_prefill: int, logits_per_row: int = 1, draft: LoadedModel | None = None) -> _Sizing:
    """Check one step's analytic peak, then size the KV cache from what is left and derive the limits.

    logits_per_row: vocabulary-wide logits rows per sampled row (1 + N with N Medusa heads). A block
    holds the draft's K/V too, where there is a draft (--speculative-model)."""
    model_config, device = loaded.model_config, loaded.device
    block_bytes = _bytes_per_block(loaded) + (_bytes_per_block(draft) if draft is not None else 0)
    prefill_tokens = config.max_batch_prefill_tokens or default_prefill
    # Logits rows of a step: every prompt token with prefill logprobs, else one per sequence and one
    # more per token it verifies (--speculate).
    rows_per_seq = 1 + (config.speculate or 0)
    sampling_rows = (prefill_tokens if config.enable_prefill_logprobs
                     else min(prefill_tokens, (config.max_batch_size or config.max_concurrent_requests) * rows_per_seq))
    sampling_rows *= logits_per_row
    step = step_memory(model_config, loaded.dtype, prefill_tokens,
                       max_context_bound(config, model_config, model_max_length, constraints), sampling_rows)
    free_bytes = hook.tgserve_get_free_memory_bytes(device=device)
    check_step_fits(config, free_bytes, step.total_bytes, prefill_tokens)
    num_blocks = num_kv_blocks(config, free_bytes, block_bytes, loaded.block_size, step.total_bytes,
                               hook.tgserve_get_default_kv_cache_bytes(device=device))

    def limits_for(num_blocks: int) -> RuntimeLimits:
        return derive_limits(config, model_config, model_max_length, num_blocks, loaded.block_size, constraints,
                             default_prefill)

    limits = limits_for(num_blocks)
    usable_blocks = -(-config.max_concurrent_requests * limits.max_total_tokens // loaded.block_size) + 1
    if config.max_batch_total_tokens is None and num_blocks > usable_blocks:
        # More cache than every allowed request at full length could ever fill is memory thrown away.
        num_blocks = usable_blocks
        limits = limits_for(num_blocks)
    return _Sizing(num_blocks, limits, num_blocks * block_bytes, step, usable_bytes(config, free_bytes))


def _log_probe(config: ServerConfig, probe: ProbeResult, policy: WarmupPolicy, sizing: _Sizing,
               backend_name: str) -> None:
    """The one line that says what the probe measured, which prefill budget follows, and why it fits."""
    prefill = sizing.limits.max_batch_prefill_tokens
    why = ("set by --max-batch-prefill-tokens" if config.max_batch_prefill_tokens
           else f"{policy.prefill_step_s:g}s of the measured prefill speed per step, as TGI sizes it from GPU FLOPs")
    log.info("Warmup: probe of %d prefill tokens in %.2fs (%.0f tokens/s on this %s; %.0f tokens/s over a "
             "%gs step), %.2fs in all; "
             "max_batch_prefill_tokens=%d (%s); memory checked without a full step: %d MiB peak per step "
             "+ %d MiB KV cache <= %d MiB allowed", probe.num_tokens, probe.step_s, probe.tokens_per_s,
             backend_name, probe.tokens_per_s_over(policy.prefill_step_s), policy.prefill_step_s, probe.elapsed_s, prefill, why, sizing.step.total_bytes // _MIB,
             sizing.kv_cache_bytes // _MIB, sizing.usable_bytes // _MIB)


def _bytes_per_block(loaded: LoadedModel) -> int:
    """One block's K and V over every layer, for this rank's KV heads (what its cache holds)."""
    mc = loaded.local_config
    return KVCache.bytes_per_block(mc.num_hidden_layers, loaded.block_size, mc.num_key_value_heads, mc.head_dim,
                                   loaded.dtype)


def start_engine(config: ServerConfig, backend: ActiveBackend, progress: bool = True,
                 ranks: Ranks | None = None) -> Engine:
    """Build the engine on a thread of its own and run its loop there; return once it serves.

    Every torch op of the server then comes from that one thread. A second thread doing torch work
    gives OpenMP a second worker pool, and once the pools hold more threads than there are cores
    libgomp stops spinning between parallel regions: measured here (2 cores), decode steps of the
    Qwen2-0.5B shape ran 30-40% slower when built on one thread and stepped on another.
    Re-raises whatever `build_engine` raised.
    """
    built: dict[str, object] = {}
    ready = threading.Event()

    def run() -> None:
        try:
            engine = build_engine(config, backend, progress, ranks)
        except BaseException as error:  # handed to the caller below
            built["error"] = error
            ready.set()
            return
        built["engine"] = engine
        ready.set()
        engine.run_in_current_thread()

    threading.Thread(target=run, name="tgserve-engine", daemon=True).start()
    ready.wait()
    if "error" in built:
        raise built["error"]
    engine = built["engine"]
    while not engine.is_healthy:  # the loop sets itself running right after `ready`
        threading.Event().wait(0.001)
    return engine


__all__ = ["build_engine", "start_engine", "resolve_source", "ConfigError", "DEMO_MODEL_ID"]
