"""The KV cache is allocated uninitialized and zeroed block by block as steps reach it; garbage in
never-used memory (stood for by NaN) must not change a single generated token."""
from __future__ import annotations

import math

import torch

from tgserve.core import kv_cache as kv_cache_module
from tgserve.core.kv_cache import KVCache

from .engine_harness import request, run_all, running_engine


def _nan_filled(shape, dtype, device):
    return torch.full(shape, math.nan, dtype=dtype, device=device)


def _zero_filled(shape, dtype, device):
    return torch.zeros(shape, dtype=dtype, device=device)


def _is_finite_per_block(cache: KVCache) -> list[bool]:
    k_cache, v_cache = cache.layers[-1]
    return [bool(torch.isfinite(k_cache[b]).all() and torch.isfinite(v_cache[b]).all())
            for b in range(cache.num_blocks)]


def test_only_block_0_is_zeroed_at_allocation_and_blocks_are_zeroed_once_as_steps_reach_them(monkeypatch):
    monkeypatch.setattr(kv_cache_module, "allocate", _nan_filled)
    cache = KVCache(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32,
                    device=torch.device("cpu"))
    assert _is_finite_per_block(cache) == [True] + [False] * 7
    assert all(float(k[0].abs().sum()) == 0.0 for k, _ in cache.layers)
    cache.initialize_blocks(3)
    assert _is_finite_per_block(cache) == [True] * 4 + [False] * 4
    cache.layers[0][0][2].fill_(5.0)  # a step wrote K/V into block 2
    cache.initialize_blocks(2)  # a later step reaching only block 2 must not wipe what it holds
    cache.initialize_blocks(1)
    assert float(cache.layers[0][0][2].min()) == 5.0
    cache.initialize_blocks(7)
    assert all(_is_finite_per_block(cache)) and float(cache.layers[0][0][2].min()) == 5.0


# Prompts of different lengths, run together: decode rows gather the unwritten tail of their last
# block, shorter sequences gather past their own context up to the longest one, and padded block
# table entries point at block 0. The small step budget chunks the long prompts.
PROMPTS = [[5, 6, 7], list(range(40, 77)), [9], list(range(100, 150)), list(range(200, 219))]


def _generate(model_dir, allocate, monkeypatch) -> list[list[int]]:
    monkeypatch.setattr(kv_cache_module, "allocate", allocate)
    with running_engine(model_dir, dtype="float32", max_batch_prefill_tokens=24, max_batch_total_tokens=2048,
                        max_total_tokens=512) as engine:
        alone = [run_all(engine, [request(prompt, max_new_tokens=20)])[0].ids for prompt in PROMPTS[:2]]
        together = [sink.ids for sink in run_all(engine, [request(p, max_new_tokens=20) for p in PROMPTS])]
    return alone + together


def test_garbage_in_unused_cache_memory_never_reaches_the_output(demo_model_dir, monkeypatch):
    expected = _generate(demo_model_dir, _zero_filled, monkeypatch)
    assert all(len(ids) > 0 for ids in expected)
    assert _generate(demo_model_dir, _nan_filled, monkeypatch) == expected
