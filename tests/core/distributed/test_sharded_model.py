"""The Llama / Qwen2 model sharded over real gloo ranks (2, and 4 with KV heads replicated) computes the
logits of the unsharded model: every token of a two-prompt prefill and of a mixed step (decode rows
plus a new prompt), in float32, unquantized and through GPTQ's packed int4 tensors; in bf16 its
logprobs stay within bf16's own rounding.

Oracle: the same model at one rank, on the same checkpoint and steps (sharding must change nothing but
summation order). The tiny config has 8 query and 2 KV heads: 2 ranks split the KV heads, 4 ranks
replicate each over two ranks, 3 ranks must be refused with the counts that work.
"""
from __future__ import annotations

import multiprocessing
import socket
import time

import pytest
import torch

from tgserve.core.distributed.head_sharding import (ShardCountError, local_model_config, shard_heads,
                                                   valid_shard_counts)
from tgserve.core.distributed.tensor_parallel import TensorParallel
from tgserve.core.model_config import ModelConfig
from tests.core.quantization.gptq_writer import gptq_quantize, quantization_config

from .sharded_step import rank_main, run_steps

RANK_TIMEOUT_S = 240  # spawning, importing torch and two tiny models per rank, on a shared 2-core machine
FAILED_PEERS_GRACE_S = 5  # after one rank fails, how long the others may take to exit before SIGKILL
BF16_CASES = {"llama-bf16": "llama-unquantized"}  # bf16 case -> the same checkpoint in float32
# Measured (2 ranks): sharded bf16 vs one rank's bf16 logprobs at most 0.031-0.032 apart over every token and
# vocabulary entry; one rank's bf16 vs float32, 0.030-0.039: sharding moves bf16 about as much as bf16 does.
BF16_LOGPROB_TOLERANCE = 0.05
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_config(model_type: str, tie: bool) -> dict:
    """8 query heads over 2 KV heads of 16; widths that split over 4 ranks in GPTQ groups of 32."""
    return {"model_type": model_type, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": tie, "eos_token_id": 0}


def float_checkpoint(raw: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights scaled so activations stay O(1) through the layers (logits differ clearly per token)."""
    cfg, generator = ModelConfig.from_dict(raw), torch.Generator().manual_seed(seed)
    q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"self_attn.q_proj": (q_size, cfg.hidden_size), "self_attn.k_proj": (kv_size, cfg.hidden_size),
              "self_attn.v_proj": (kv_size, cfg.hidden_size), "self_attn.o_proj": (cfg.hidden_size, q_size),
              "mlp.gate_proj": (cfg.intermediate_size, cfg.hidden_size),
              "mlp.up_proj": (cfg.intermediate_size, cfg.hidden_size),
              "mlp.down_proj": (cfg.hidden_size, cfg.intermediate_size)}

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    tensors = {"model.embed_tokens.weight": randn(cfg.vocab_size, cfg.hidden_size),
               "model.norm.weight": 1 + randn(cfg.hidden_size, scale=0.1)}
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for name, shape in shapes.items():
            tensors[f"{prefix}{name}.weight"] = randn(*shape, scale=shape[1] ** -0.5)
        if cfg.attention_bias:
            for name in ("q_proj", "k_proj", "v_proj"):
                tensors[f"{prefix}self_attn.{name}.bias"] = randn(shapes[f"self_attn.{name}"][0], scale=0.1)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}{norm}.weight"] = 1 + randn(cfg.hidden_size, scale=0.1)
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = randn(cfg.vocab_size, cfg.hidden_size, scale=cfg.hidden_size ** -0.5)
    return tensors


def gptq_checkpoint(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every decoder linear as 4-bit asymmetric GPTQ in groups of 32 (the writer's published layout);
    lm_head stays float, as GPTQ checkpoints keep it. Row-parallel ranks then cut qweight along packed
    input words and scales / qzeros along groups; column-parallel k / v cut qzeros inside packed words."""
    quantized = {}
    for name, tensor in tensors.items():
        module = name.rsplit(".", 1)[0]
        if module.split(".", 3)[-1] in LINEARS and name.endswith(".weight"):
            quantized.update(gptq_quantize(tensor, 4, 32, sym=False, act_order=False).as_checkpoint(module + "."))
        else:
            quantized[name] = tensor
    return quantized


@pytest.fixture(scope="module")
def cases() -> dict[str, dict]:
    """Unquantized Qwen2 (q/k/v biases, tied lm_head), GPTQ int4 Llama (separate float lm_head), and that
    Llama unquantized in float32 and in bf16 (its lm_head keeps logits O(1), so logprobs are informative)."""
    qwen2, llama = tiny_config("qwen2", tie=True), tiny_config("llama", tie=False)
    llama_tensors = float_checkpoint(llama, seed=2)
    return {"qwen2-unquantized": {"config": qwen2, "tensors": float_checkpoint(qwen2, seed=1), "quantization": None},
            "llama-gptq-int4": {"config": llama, "tensors": gptq_checkpoint(llama_tensors),
                                "quantization": quantization_config(4, 32, sym=False)},
            "llama-unquantized": {"config": llama, "tensors": llama_tensors, "quantization": None},
            "llama-bf16": {"config": llama, "tensors": llama_tensors, "quantization": None, "dtype": "bfloat16"}}


@pytest.fixture(scope="module")
def reference(cases) -> dict[str, list[torch.Tensor]]:
    """Each case's logits per step at one rank (no process group: the collectives return at once)."""
    return {name: run_steps(case, TensorParallel.single()) for name, case in cases.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RankFailed(AssertionError):
    """A spawned rank exited non-zero or overran its time; the message carries the ranks' own errors."""


def run_ranks(world_size: int, cases: dict, tmp_path) -> dict[str, list[torch.Tensor]]:
    """Spawn `world_size` ranks over gloo; rank 0's logits per case and step. Raises RankFailed, never
    hangs, when a rank dies or overruns RANK_TIMEOUT_S, and leaves no rank process behind either way."""
    cases_path = tmp_path / "cases.pt"
    torch.save(cases, cases_path)
    context, port = multiprocessing.get_context("spawn"), free_port()
    ranks = [context.Process(target=rank_main, args=(rank, world_size, port, str(cases_path), str(tmp_path)),
                             name=f"tp-rank-{rank}") for rank in range(world_size)]
    for process in ranks:
        process.start()
    try:
        deadline = time.monotonic() + RANK_TIMEOUT_S
        while any(process.is_alive() for process in ranks) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in ranks):  # the others get a moment to fail on their own
                deadline = min(deadline, time.monotonic() + FAILED_PEERS_GRACE_S)
            time.sleep(0.2)
    finally:
        for process in ranks:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)
    assert not any(process.is_alive() for process in ranks), "a rank survived SIGKILL"
    if any(process.exitcode != 0 for process in ranks):
        errors = [path.read_text() for path in sorted(tmp_path.glob("rank-*.error"))]
        raise RankFailed(f"exit codes {[p.exitcode for p in ranks]} (negative: killed, after {RANK_TIMEOUT_S} s "
                         f"at most); rank errors: {errors}")
    return torch.load(tmp_path / "logits.pt")


@pytest.mark.parametrize("world_size", [2, 4], ids=["2-ranks", "4-ranks-kv-replicated"])
def test_sharded_logits_equal_the_unsharded_model(world_size, cases, reference, tmp_path):
    sharded = run_ranks(world_size, cases, tmp_path)
    assert sharded.keys() == reference.keys()
    for name, steps in reference.items():
        if name in BF16_CASES:
            continue
        for step, (expected, got) in enumerate(zip(steps, sharded[name])):
            assert got.shape == expected.shape, (name, step)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=f"{name}, step {step}")
            assert torch.equal(got.argmax(-1), expected.argmax(-1)), (name, step)
    for bf16, float32 in BF16_CASES.items():
        for step, (expected, got, exact) in enumerate(zip(reference[bf16], sharded[bf16], reference[float32])):
            # bf16 rounds each rank's partial sums before the all-reduce adds them: the sharded logprobs
            # move from one rank's, by about as much as bf16 itself moves them from float32.
            sharded_gap = (logprobs(got) - logprobs(expected)).abs().max().item()
            bf16_gap = (logprobs(expected) - logprobs(exact)).abs().max().item()
            assert sharded_gap <= min(BF16_LOGPROB_TOLERANCE, 2 * bf16_gap), (step, sharded_gap, bf16_gap)


def logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def test_ranks_building_a_model_their_heads_do_not_split_over_all_fail_with_the_counts_that_work(cases, tmp_path):
    """3 ranks, 8 query heads: every rank raises ShardCountError while building, before any collective,
    so none waits on another; the ranks exit and the error names the shard counts that work."""
    with pytest.raises(RankFailed, match=r"ShardCountError: cannot shard this model over 3 ranks.*"
                                         r"shard counts that work: 1, 2, 4, 8") as failure:
        run_ranks(3, {"qwen2-unquantized": cases["qwen2-unquantized"]}, tmp_path)
    assert "exit codes [1, 1, 1]" in str(failure.value)  # each failed by itself, within the grace period


def test_shard_counts_the_heads_do_not_split_over_are_refused_with_the_counts_that_work():
    tiny = ModelConfig.from_dict(tiny_config("qwen2", tie=True))
    assert valid_shard_counts(tiny) == [1, 2, 4, 8]
    with pytest.raises(ShardCountError, match="8 query heads, 2 KV heads.*shard counts that work: 1, 2, 4, 8"):
        shard_heads(tiny, 3)
    # Qwen2-0.5B's shape: 14 query / 2 KV heads, MLP 4864, vocabulary 151936
    qwen2_05b = ModelConfig.from_dict({**tiny_config("qwen2", tie=True), "num_attention_heads": 14,
                                      "hidden_size": 896, "head_dim": 64, "intermediate_size": 4864,
                                      "vocab_size": 151936})
    with pytest.raises(ShardCountError, match="over 4 ranks: it has 14 query heads.*work: 1, 2$"):
        shard_heads(qwen2_05b, 4)


@pytest.mark.parametrize("world_size, heads, kv_heads, kv_shards", [(1, 8, 2, 1), (2, 4, 1, 2), (4, 2, 1, 2),
                                                                    (8, 1, 1, 2)])
def test_each_rank_sees_its_own_query_and_kv_heads(world_size, heads, kv_heads, kv_shards):
    tiny = ModelConfig.from_dict(tiny_config("qwen2", tie=True))
    sharding = shard_heads(tiny, world_size)
    assert (sharding.num_heads, sharding.num_kv_heads, sharding.num_kv_shards) == (heads, kv_heads, kv_shards)
    local = local_model_config(tiny, world_size)
    assert (local.num_attention_heads, local.num_key_value_heads, local.head_dim) == (heads, kv_heads, 16)
