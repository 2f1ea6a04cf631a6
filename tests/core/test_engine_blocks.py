"""The engine's block bookkeeping on the demo model: every block its requests fill with computed
tokens gets its chained content hash, and every block goes back to the pool."""
from __future__ import annotations

from tgserve.core.block_manager import ROOT_HASH, block_hash
from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams

from .engine_harness import run_all, running_engine


def _chained_hashes(token_ids: list[int], num_computed: int, block_size: int) -> list[bytes]:
    """The expected hashes: each full block of computed tokens chained to the one before, by hand."""
    hashes, parent = [], ROOT_HASH
    for start in range(0, num_computed - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


def test_the_engine_hashes_the_blocks_its_requests_fill(demo_model_dir, monkeypatch):
    with running_engine(demo_model_dir, dtype="float32", max_batch_prefill_tokens=24, max_batch_total_tokens=2048,
                        max_total_tokens=512) as engine:
        blocks = engine.scheduler.blocks
        seen = {}
        real_hash_full_blocks = blocks.hash_full_blocks

        def recording(seq):
            seen[seq.request_id] = seq
            real_hash_full_blocks(seq)

        monkeypatch.setattr(blocks, "hash_full_blocks", recording)
        prompt = list(range(3, 3 + 2 * blocks.block_size + 5))  # chunked: the step budget is 24 tokens
        stopping = StoppingParams(max_new_tokens=blocks.block_size, ignore_eos_token=True)
        sinks = run_all(engine, [GenerationRequest(prompt, SamplingParams(), stopping) for _ in range(2)])
        assert blocks.num_free_blocks == blocks.num_usable_blocks
    first, second = (seen[i] for i in sorted(seen))
    assert first.block_hashes == second.block_hashes  # the same prompt and greedy tokens: the same blocks
    for seq, sink in zip((first, second), sinks):
        # Every token but the last sampled one went through the model.
        assert seq.num_computed_tokens == len(prompt) + len(sink.ids) - 1 == len(seq.token_ids) - 1
        assert seq.block_hashes == _chained_hashes(seq.token_ids, seq.num_computed_tokens, blocks.block_size)
        assert len(seq.block_hashes) == 3


def _answer(engine, prompt: list[int]) -> tuple[list[int], list[float], int]:
    """(greedy ids, their logprobs, the prompt tokens reused from the prefix cache)."""
    stopping = StoppingParams(max_new_tokens=8, ignore_eos_token=True)
    (sink,) = run_all(engine, [GenerationRequest(list(prompt), SamplingParams(), stopping, top_n_tokens=2)])
    return sink.ids, [e.logprob for e in sink.events], sink.events[-1].finish.cached_tokens


def test_a_cached_prefix_then_prefill_chunks_answer_as_computing_the_prompt_whole(demo_model_dir):
    """Greedy float32, a step budget of 24 tokens: the second prompt reuses the first's two full blocks
    (32 tokens) and prefills its other 38 in two chunks after them; ids equal and logprobs within
    rounding of an engine with prefix caching off, and every block back."""
    first = list(range(3, 43))  # 40 tokens
    second = first + list(range(100, 130))  # 70: shares the first two blocks of 16
    settings = dict(dtype="float32", max_batch_prefill_tokens=24, max_batch_total_tokens=2048, max_total_tokens=512)
    with running_engine(demo_model_dir, prefix_caching=False, **settings) as engine:
        want = _answer(engine, second)
    with running_engine(demo_model_dir, **settings) as engine:
        blocks = engine.scheduler.blocks
        _answer(engine, first)
        cached_blocks = blocks.num_cached_free_blocks
        got = _answer(engine, second)
        assert blocks.num_free_blocks == blocks.num_usable_blocks
        blocks.check_invariants()
    assert cached_blocks >= 2
    assert (got[2], want[2]) == (32, 0)
    assert got[0] == want[0]
    assert all(abs(a - b) < 1e-4 for a, b in zip(got[1], want[1]))
