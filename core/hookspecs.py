"""Every hook a tgserve plugin may implement, in the order a server's life calls them.

A backend plugin is a module (or object) registered under the entry-point group `tgserve.backends`;
the built-in cpu, cuda, rocm, gaudi and inferentia backends register exactly the same way a vendor's
`pip install tgserve-foo` would. Every backend answers `tgserve_get_backend_status`; after selection
only the chosen backend (plus the core's reference implementations, registered `trylast`) answers
the other hooks, so a backend overrides a default simply by implementing the hook.

Conventions: hooks are called with keyword arguments only; `tgserve_get_*` / `tgserve_make_*` return
one object and the first non-None result wins; `tgserve_on_*` are notifications whose results are
ignored. A spec only ever changes by gaining parameters. Wherever a hook receives `dtype` it is a
`torch.dtype`; `device` is a `torch.device`. The selection and memory hooks (status, device, default
dtype, free memory, dist backend, synchronize) have no core default: a backend must implement them
(the default KV-cache budget is optional: no answer means no budget beyond the free memory).
"""
from __future__ import annotations

import pluggy

PROJECT = "tgserve"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- Backend selection -------------------------------------------------------------------------

@hookspec
def tgserve_get_backend_status():
    """Say whether this backend can run here, and how well.

    Returns: a `tgserve.core.backend_status.BackendStatus` (name, is_usable, priority, reason,
    install_hint, device_name, and `details`: the ISA / kernels / fast paths `tgserve backends`
    lists). Every backend answers; the results are collected, none wins.
    Called: once per process, at start-up and by `tgserve backends`, before any other hook.
    It must be cheap and must not raise: a missing SDK or device is a `reason`, not an exception.
    """


@hookspec
def tgserve_on_startup(config):
    """Prepare the process for the selected backend (thread counts, allocator settings, env).

    config: the `ServerConfig`. Called once per process, right after selection. Notification.
    """


@hookspec(firstresult=True)
def tgserve_get_device(rank):
    """The `torch.device` that tensor-parallel rank `rank` (0 when unsharded) computes on.

    rank: this process's rank among the ranks on this machine (each rank's process asks for its own):
    its tensor-parallel rank on one machine; across machines its local rank (torchrun's LOCAL_RANK).
    Called once per process after start-up. First non-None result wins.
    """


@hookspec(firstresult=True)
def tgserve_get_device_count():
    """How many devices of this backend this machine shows (visible GPUs, ...): the shard count of
    `--sharded true` without `--num-shard`, and of neither flag, as TGI's `find_num_shards`.

    Called once per process at start-up, on rank 0. First non-None result wins; the core's default is 1.
    """


@hookspec(firstresult=True)
def tgserve_get_default_dtype():
    """The dtype name ("bfloat16", "float16", "float32") used when `--dtype` is not given.

    Called once per process. First non-None result wins.
    """


@hookspec(firstresult=True)
def tgserve_get_free_memory_bytes(device):
    """Bytes of memory on `device` that the KV cache and one step's activations may take together,
    measured after the weights loaded.

    The core multiplies this by `--cuda-memory-fraction` and a safety margin, keeps the step's peak
    out of it and sizes the KV cache from the rest (capped by `tgserve_get_default_kv_cache_bytes`).
    Called once per process at start-up. First non-None result wins.
    """


@hookspec(firstresult=True)
def tgserve_get_default_kv_cache_bytes(device):
    """The most bytes the KV cache takes on `device` when `--kv-cache-gib` is not given, or None.

    None (every GPU backend: TGI fills the free memory) leaves the cache sized by
    `tgserve_get_free_memory_bytes` alone; a backend whose cache lives in host memory that the rest
    of the machine shares answers a fixed budget (cpu: 4 GiB, as vLLM-CPU's VLLM_CPU_KVCACHE_SPACE).
    Called once per process at start-up. First non-None result wins.
    """


@hookspec(firstresult=True)
def tgserve_get_dist_backend():
    """The torch.distributed backend name for this device ("gloo", "nccl", "hccl", "xla", ...), or
    None where this backend cannot shard a model.

    Optional. Called once per process when the server is sharded (tensor parallelism, `--num-shard`):
    every rank joins one process group of this backend for the model's collectives, and a gloo group
    on the host for the per-step plan broadcast. First non-None result wins.
    """


@hookspec
def tgserve_on_sharding(world_size, num_local_ranks):
    """This machine is about to start ranks of a sharded server: check what the communicator needs.

    world_size: ranks over every machine (`--num-shard`); num_local_ranks: the ranks this process
    starts on this machine (1 under torchrun, which starts each rank as its own process).
    Log a warning with the fix for a setting that will make the collectives slow or fail (cuda: a
    /dev/shm too small for NCCL, TGI's `--shm-size 1g`); raise `tgserve.core.config.ConfigError` to
    refuse the start with one line. Called once per launching process, before its ranks start, only
    when `world_size` > 1. Notification.
    """


@hookspec(firstresult=True)
def tgserve_synchronize(device):
    """Wait until all work queued on `device` has finished; return True.

    For code that times device work: warmup calls it after each step it times (a step that samples
    nothing would otherwise time as queued, not run). Never on the per-token path: a serving step
    ends by reading the sampled ids, which waits for the device anyway. First non-None result wins.
    """


# --- Model -------------------------------------------------------------------------------------

@hookspec(firstresult=True)
def tgserve_get_shape_constraints(model_config, config):
    """Static-shape limits this backend needs for `model_config` under `config`, or None.

    Returns: a `tgserve.core.shape_constraints.ShapeConstraints` (max batch size, max tokens per
    sequence, prefill and decode buckets, slot-based batching). The scheduler never plans a step
    that breaks them, the step inputs pad every step to its bucket, and a slot-based backend sees
    each sequence's slot (`ForwardBatch.batch_slots`). Called once per process, before the KV cache
    is sized. First non-None wins.
    """


@hookspec(firstresult=True)
def tgserve_get_warmup_policy(model_config, config):
    """How start-up proves that the limits fit in this backend's memory before serving.

    Returns: a `tgserve.core.warmup_policy.WarmupPolicy`. The core default is TGI's warmup: one
    full step of `max_batch_prefill_tokens` tokens, the only way to learn the activation peak where
    activations compete with the KV cache for device memory. A backend whose activations come from
    host RAM asks for a probe instead: the core checks the analytic peak, runs one small real step,
    and derives the default `max_batch_prefill_tokens` from the speed it measured.
    Called once per process, after the weights loaded. First non-None result wins.
    """


@hookspec(firstresult=True)
def tgserve_make_linear_method(quantize, dtype, device, quantization):
    """The weight preparation and matmul for linear layers under quantization method `quantize`.

    quantize: None for unquantized weights, else a method name ("gptq", "awq", "eetq", ...).
    dtype: the run dtype (activations, and unquantized weights). device: where the weights live.
    quantization: None, or the `tgserve.core.quantization.quant_config.QuantizationConfig` behind
    `quantize` (bits, group size, the checkpoint's quantization_config). A backend with fast kernels
    usually returns `tgserve.core.quantization.registry.make_quantized_method(quantization, dtype,
    dense=<its unquantized method>, kernels=<its WeightOnlyKernels>)`: the core's format loaders
    with its matmuls, tried before the reference.
    Returns: a `tgserve.core.layers.linear.LinearMethod`, shared by every linear layer (a quantized
    one answers `method_for(prefixes)` with its dense method for layers the checkpoint keeps float). It allocates
    and names each layer's parameters (`create_params`, with the dims that index output and input
    features so layers load and shard them without knowing the format), turns them into what its
    matmul reads once loaded (`prepare`, once per layer) and runs the matmul (`apply`, per layer
    per step). The core ships the reference torch method for None; backends return faster kernels.
    Called once per process. First non-None result wins; None from everyone means the method is
    not available on this backend (start-up then fails naming it).
    """


@hookspec(firstresult=True)
def tgserve_make_attention(model_config, block_size, device, dtype):
    """The paged attention implementation: how K/V are written to blocks and attended over.

    model_config: on a sharded server, the rank's own view (`head_sharding.local_model_config`: its
    query and KV heads), so attention is sized for the heads this rank holds without knowing ranks.

    Returns: a `tgserve.core.layers.attention.PagedAttention` (prepare per step, forward per layer).
    Called once per process. First non-None result wins; the core's torch reference is the default.
    """


@hookspec(firstresult=True)
def tgserve_make_fused_ops(dtype, device):
    """The elementwise work between a decoder layer's GEMMs: RMSNorm with the residual add fused in,
    and the MLP's SiLU-and-multiply.

    Returns: an object like `tgserve.core.layers.fused_ops.TorchFusedOps` (`rms_norm(x, weight, eps)`,
    `add_rms_norm(x, residual, weight, eps) -> (normalized, x + residual)`, `silu_and_mul(gate_up)`,
    and a `name` for the log), used by every layer of the model; its results must match the reference's
    (statistics in float32, the sum and the outputs in `dtype`). A backend with fused kernels returns
    them here; a single op it cannot run for some input it hands to the reference itself.
    Called once per model built (the served one, a draft), before `tgserve_make_model`. First non-None
    result wins; the core's torch reference is the default.
    """


@hookspec(firstresult=True)
def tgserve_make_model(model_config, device, dtype, linear_method, attention, tensor_parallel, fused_ops):
    """Build the runnable model for `model_config` on `device`, weights not yet loaded.

    model_config: the whole model's (layers slice the checkpoint themselves); attention: built for
    the rank's local heads; fused_ops: what `tgserve_make_fused_ops` returned, for the norms and the
    MLP's activation. tensor_parallel: this process's `tgserve.core.distributed.tensor_parallel.
    TensorParallel` (rank, world size, process group; `TensorParallel.single()` when unsharded): the
    model holds this rank's shard of every layer and runs its collectives through it.
    Returns: a `tgserve.core.models.registry.RunnableModel` (`load_weights(weights)`,
    `forward(batch, kv_cache)`, `compute_logits(hidden)`, the last None on ranks other than 0).
    The core builds its own Qwen2 / Llama code; a backend may return something else entirely
    (a compiled graph, a wrapped model). Called once per process (every rank builds its own).
    First non-None result wins.
    """


# --- Attention and KV cache --------------------------------------------------------------------

@hookspec(firstresult=True)
def tgserve_get_block_size():
    """Tokens per KV-cache block on this backend (the core default is 16).

    Called once per process. First non-None result wins.
    """


@hookspec(firstresult=True)
def tgserve_make_kv_cache(num_blocks, block_size, model_config, device, dtype):
    """Allocate the paged KV cache: `num_blocks` blocks of `block_size` tokens for every layer.

    model_config: on a sharded server the rank's local view, so the cache holds its own KV heads.

    Returns: a `tgserve.core.kv_cache.KVCache`. Called once per process after the memory query.
    First non-None result wins.
    """


# --- Steps and shutdown ------------------------------------------------------------------------

@hookspec(firstresult=True)
def tgserve_make_step_inputs(capacity, block_size, constraints, device):
    """The model runner's input preparation: each step's plan into the device `ForwardBatch`.

    capacity: the `tgserve.core.step_inputs.StepCapacity` of the largest step the scheduler plans
    (padded to the largest buckets); block_size: tokens per KV block; constraints: this backend's
    `ShapeConstraints` or None; device: where the inputs live.
    Returns: a `tgserve.core.step_inputs.StepInputs` (or an object with its `prepare(plan)`), whose
    buffers are allocated here, once, and filled in place every step, so graphs can be captured
    over them. The core's default stages in pageable host memory; a backend whose device has memory
    of its own returns `StepInputs(..., is_pinned=True)` so the host-to-device copies run async.
    Called once per runner (the serving one; on a probing backend also the start-up probe's), after
    the KV cache. First non-None result wins.
    """


@hookspec(firstresult=True)
def tgserve_make_model_runner(model, kv_cache, attention, step_inputs, device, vocab_size, config):
    """The model runner: one step of a plan through inputs, model, logits and sampling.

    model, kv_cache, attention, step_inputs: what the hooks above returned; vocab_size: the model's;
    config: the `ServerConfig` (watermark settings, ...).
    Returns: an object like `tgserve.core.model_runner.ModelRunner`: `execute(plan) -> StepOutput`
    once per step, and `vocab_size`, `device`, `step_broadcast` attributes. The core's runner is the
    default; a backend returns its own (or a wrapper of the core's) to run steps its way, e.g.
    replaying captured graphs. On a sharded server start-up sets `step_broadcast` (a
    `tgserve.core.distributed.step_broadcast.StepBroadcast`) on rank 0's runners: each step must hand
    it the prepared batch once, before the forward, so the other ranks run the same forward.
    Called once per runner, right after `tgserve_make_step_inputs`. First non-None result wins.
    """


@hookspec
def tgserve_on_model_ready(model, kv_cache, limits):
    """The model is loaded and warmed up with the final `limits`; capture graphs here if you want.

    Called once per process, after warmup, before serving. Notification.
    """


@hookspec
def tgserve_on_shutdown():
    """The server is stopping; release device resources. Called once per process. Notification."""
