"""How a model's attention heads split over tensor-parallel ranks, and which shard counts can work.

Query heads split evenly: each rank holds num_heads / world. KV heads split evenly while there are at
least as many as ranks; beyond that they are replicated, as vLLM does: each rank holds one KV head
and ranks r with the same r * num_kv_heads // world share it. Grouped-query attention stays local
that way, because a rank's query heads all read that one KV head (num_heads / world divides the
group size num_heads / num_kv_heads whenever world is a multiple of num_kv_heads). The KV cache and
attention of a rank see only its local heads, through `local_model_config`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tgserve.core.model_config import ModelConfig


class ShardCountError(ValueError):
    """A shard count the model's heads (or its MLP width, or vocabulary) do not split over; the message
    lists the counts that work, so `--num-shard` can be fixed at start instead of failing in a layer."""


@dataclass(slots=True, frozen=True)
class HeadSharding:
    """One rank's share of the attention heads."""

    num_heads: int  # query heads on this rank (num_attention_heads / world)
    num_kv_heads: int  # KV heads on this rank: num_key_value_heads / world, or 1 when replicated
    num_kv_shards: int  # distinct KV-head slices over all ranks: min(world, num_key_value_heads)


def valid_shard_counts(cfg: ModelConfig) -> list[int]:
    """Every shard count this model splits over: query heads, MLP width and vocabulary divide by it, and
    its KV heads either divide by it or divide it (replication)."""
    return [n for n in range(1, cfg.num_attention_heads + 1) if _is_valid(cfg, n)]


def _is_valid(cfg: ModelConfig, world_size: int) -> bool:
    kv = cfg.num_key_value_heads
    kv_splits = kv % world_size == 0 if world_size <= kv else world_size % kv == 0
    return (cfg.num_attention_heads % world_size == 0 and kv_splits
            and cfg.intermediate_size % world_size == 0 and cfg.vocab_size % world_size == 0)


def shard_heads(cfg: ModelConfig, world_size: int) -> HeadSharding:
    """This model's heads per rank at `world_size` ranks; raises ShardCountError naming the counts that work."""
    if not _is_valid(cfg, world_size):
        raise ShardCountError(
            f"cannot shard this model over {world_size} ranks: it has {cfg.num_attention_heads} query heads, "
            f"{cfg.num_key_value_heads} KV heads, intermediate size {cfg.intermediate_size} and vocabulary "
            f"{cfg.vocab_size}; shard counts that work: {', '.join(map(str, valid_shard_counts(cfg)))}")
    kv_shards = min(world_size, cfg.num_key_value_heads)
    return HeadSharding(cfg.num_attention_heads // world_size, cfg.num_key_value_heads // kv_shards, kv_shards)


def local_model_config(cfg: ModelConfig, world_size: int) -> ModelConfig:
    """`cfg` as one rank sees its attention: its local query and KV head counts, the rest unchanged.

    What `tgserve_make_attention` and `tgserve_make_kv_cache` receive on a sharded server, so every
    backend's attention and cache are sized for the rank's heads without knowing about ranks. The
    model itself is built from the full config (its layers slice the checkpoint).
    """
    heads = shard_heads(cfg, world_size)
    return dataclasses.replace(cfg, num_attention_heads=heads.num_heads, num_key_value_heads=heads.num_kv_heads)
