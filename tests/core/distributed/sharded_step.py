"""A tiny model's steps at one tensor-parallel rank, and the spawned gloo ranks that run them.

Shared by the sharded-model tests: the parent process computes the unsharded reference with
`run_steps(case, TensorParallel.single())`, and each spawned rank runs the same function with its own
`TensorParallel` over a real gloo process group, as a sharded server runs: rank 0 prepares each step
and broadcasts it (`StepBroadcast`), the other ranks follow in the serving loop itself
(`shard_worker.serve_steps`: KV cache, steps, shutdown). A case is a picklable dict: the checkpoint's
config.json fields, its tensors, and its quantization_config (None: unquantized).

The steps: two prompts prefilled together, then a mixed step with their two decode rows first and a
third prompt's prefill, over scattered KV blocks of 4 tokens, so attention reads several blocks.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tgserve.core.distributed.head_sharding import local_model_config
from tgserve.core.distributed.shard_worker import serve_steps
from tgserve.core.distributed.step_broadcast import StepBroadcast, StepReceiver
from tgserve.core.distributed.tensor_parallel import TensorParallel
from tgserve.core.kv_cache import KVCache
from tgserve.core.layers.attention import TorchPagedAttention
from tgserve.core.layers.linear import LinearMethod
from tgserve.core.model_config import ModelConfig
from tgserve.core.model_loading import LoadedModel
from tgserve.core.models.registry import model_class
from tgserve.core.quantization.gptq import GptqLinearMethod
from tgserve.core.quantization.quant_config import resolve_quantization
from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.sequence import Sequence
from tgserve.core.step_inputs import StepInputs, step_capacity
from tgserve.core.step_plan import ScheduledSequence, StepPlan

BLOCK_SIZE = 4
NUM_BLOCKS = 40
CPU = torch.device("cpu")
# Per step: (sequence index, tokens already cached, tokens computed this step), decode rows first.
STEPS = [[(0, 0, 11), (1, 0, 6)], [(0, 11, 1), (1, 6, 1), (2, 0, 9)]]


def prompt_tokens(seq_index: int, length: int, vocab_size: int) -> list[int]:
    """Token ids spread over the whole vocabulary, so every rank's embedding and lm_head rows are used."""
    return [(97 * i + 131 * seq_index + 5) % vocab_size for i in range(length)]


def step_batches(vocab_size: int):
    """The ForwardBatches of `STEPS`, made by StepInputs exactly as the model runner makes them."""
    inputs = StepInputs(step_capacity(64, 8, 32, NUM_BLOCKS, BLOCK_SIZE), BLOCK_SIZE, CPU)
    for step in STEPS:
        plan = StepPlan(max_block_id=NUM_BLOCKS - 1)
        for index, cached, new in step:
            total = cached + new
            tokens = prompt_tokens(index, total, vocab_size)
            seq = Sequence(index, GenerationRequest(tokens, SamplingParams(), StoppingParams(max_new_tokens=4)),
                           tokens, total, total + 4)
            seq.num_computed_tokens = cached
            # scattered, not consecutive: block 0 is padding, sequence s owns 1 + s, 4 + s, 7 + s, ...
            seq.block_ids = [1 + index + 3 * b for b in range(-(-total // BLOCK_SIZE))]
            plan.scheduled.append(ScheduledSequence(seq, new))
        yield inputs.prepare(plan)


def linear_method(quantization_section: dict | None, dtype: torch.dtype) -> LinearMethod:
    if quantization_section is None:
        return LinearMethod()
    quantization = resolve_quantization(None, {"quantization_config": quantization_section})
    return GptqLinearMethod(quantization, dtype, dense=LinearMethod())


def make_kv_cache(num_blocks, block_size, model_config, device, dtype) -> KVCache:
    """The core's KV cache, as `tgserve_make_kv_cache` makes it (keyword arguments)."""
    return KVCache(model_config.num_hidden_layers, num_blocks, block_size, model_config.num_key_value_heads,
                   model_config.head_dim, dtype, device)


def run_steps(case: dict, tp: TensorParallel, control_group=None) -> list[torch.Tensor | None]:
    """The logits [tokens, vocab] of every token of every step (None on ranks other than 0).

    control_group: the gloo group the step header crosses on (None at one rank)."""
    cfg = ModelConfig.from_dict(case["config"])
    dtype = getattr(torch, case.get("dtype", "float32"))  # the run dtype of weights, activations and KV cache
    local = local_model_config(cfg, tp.world_size)  # the rank's attention and cache see its own heads
    attention = TorchPagedAttention(local.num_attention_heads, local.num_key_value_heads, cfg.head_dim, BLOCK_SIZE)
    model = model_class(cfg.model_type)(cfg, linear_method(case["quantization"], dtype), attention, dtype, CPU, tp)
    model.load_weights(case["tensors"].items())
    if not tp.is_sampling_rank:  # the serving loop of ranks 1..N-1, until rank 0's shutdown
        loaded = LoadedModel(model, attention, cfg, CPU, dtype, BLOCK_SIZE, local)
        serve_steps(StepReceiver(tp, control_group, CPU), loaded, make_kv_cache)
        return [None] * len(STEPS)
    broadcast = StepBroadcast(tp, control_group, CPU) if tp.world_size > 1 else None
    if broadcast is not None:
        broadcast.send_kv_cache(NUM_BLOCKS)
    kv_cache = make_kv_cache(NUM_BLOCKS, BLOCK_SIZE, local, CPU, dtype)
    logits = []
    with torch.inference_mode():
        for batch in step_batches(cfg.vocab_size):
            # Every token's logits, asked for as prompt-logprob rows (the others compute their slices of
            # them first, then of the sampled rows, as the model runner orders them).
            rows = list(range(batch.num_tokens))
            if broadcast is not None:
                broadcast.send_step(batch, rows, NUM_BLOCKS - 1)
            kv_cache.initialize_blocks(NUM_BLOCKS - 1)  # as the runner does before a step reaches them (finite K/V)
            batch.attention = attention.prepare(batch)
            hidden = model.forward(batch, kv_cache)
            logits.append(model.compute_logits(hidden[torch.tensor(rows)]))
            model.compute_logits(hidden.index_select(0, batch.logits_indices))
    if broadcast is not None:
        broadcast.send_shutdown()
    return logits


def rank_main(rank: int, world_size: int, port: int, cases_path: str, out_dir: str) -> None:
    """One spawned rank: join the gloo group, run every case, rank 0 saves {case name: logits per step} to
    out_dir/logits.pt. A rank that fails writes its error to out_dir/rank-<r>.error for the parent to show."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))  # a dead peer fails the collectives, not hangs them
    try:
        tp, control_group = TensorParallel.from_group(), dist.new_group(backend="gloo")
        results = {name: run_steps(case, tp, control_group) for name, case in torch.load(cases_path).items()}
        if rank == 0:
            torch.save(results, Path(out_dir) / "logits.pt")
        else:
            assert all(step is None for steps in results.values() for step in steps), "only rank 0 gets logits"
    except BaseException as error:
        (Path(out_dir) / f"rank-{rank}.error").write_text(f"{type(error).__name__}: {error}")
        raise
    finally:
        dist.destroy_process_group()
