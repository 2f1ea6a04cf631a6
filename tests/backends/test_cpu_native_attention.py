"""The cpu backend's native paged attention (backends/cpu/native/paged_attention.cpp) against the core's
TorchPagedAttention on the same random caches and real step layouts (StepInputs: decode rows first,
padding rows of bucketed steps), its routing and switches, the fallback when the build is refused, and
greedy ids through the engine with it on and off."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from tgserve.backends.cpu import plugin
from tgserve.backends.cpu.native_attention import MAX_QUERIES, NativePagedAttention, is_usable
from tgserve.backends.cpu.native_kernels import NativeBuildError
from tgserve.core.layers.attention import TorchPagedAttention
from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.sequence import Sequence
from tgserve.core.shape_constraints import ShapeConstraints
from tgserve.core.step_inputs import StepInputs, step_capacity
from tgserve.core.step_plan import ScheduledSequence, StepPlan

COMPILER = "c++"
BLOCK_SIZE = 16
NUM_BLOCKS = 96
MAX_TOTAL_TOKENS = 320
MAX_STEP_TOKENS = 512


@pytest.fixture(scope="module")
def ops():
    """The library, built here if no earlier run cached it (~40 s). A machine with a compiler must build it."""
    if shutil.which(COMPILER) is None:
        pytest.skip(f"the native attention needs a C++ compiler ({COMPILER})")
    plugin.native_attention_ops.cache_clear()
    loaded = plugin.native_attention_ops()
    assert loaded is not None, "the native build failed on a machine with a compiler: see the warning logged"
    return loaded


def make_batch(seqs: list[tuple[int, int]], constraints: ShapeConstraints | None = None):
    """seqs: (tokens already cached, tokens computed this step), decode rows first -> the step's ForwardBatch,
    made by StepInputs exactly as the runner makes it (scattered blocks; padded where `constraints` say)."""
    generator = torch.Generator().manual_seed(len(seqs))
    free_blocks = iter((torch.randperm(NUM_BLOCKS - 1, generator=generator) + 1).tolist())  # block 0: padding
    plan = StepPlan()
    for index, (cached, new) in enumerate(seqs):
        total = cached + new
        request = GenerationRequest(list(range(total)), SamplingParams(), StoppingParams(max_new_tokens=4))
        seq = Sequence(index, request, list(range(total)), total, total + 4)
        seq.num_computed_tokens = cached
        seq.block_ids = [next(free_blocks) for _ in range(-(-total // BLOCK_SIZE))]
        plan.scheduled.append(ScheduledSequence(seq, new))
    inputs = StepInputs(step_capacity(MAX_STEP_TOKENS, 16, MAX_TOTAL_TOKENS, NUM_BLOCKS, BLOCK_SIZE, constraints), BLOCK_SIZE,
                        torch.device("cpu"), constraints)
    return inputs.prepare(plan)


def run_both(ops, seqs, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
             constraints: ShapeConstraints | None = None, max_queries: int | None = MAX_QUERIES):
    """(native output, reference output, native caches, reference caches) of one step on one random cache."""
    generator = torch.Generator().manual_seed(heads * 1000 + sum(c + n for c, n in seqs))
    batch = make_batch(seqs, constraints)
    rows = batch.input_ids.shape[0]
    # q and k as views of one rotary output, v of the fused qkv projection (strided rows, as the model passes them)
    qk = torch.randn(rows, heads + kv_heads, head_dim, generator=generator).to(dtype)
    qkv_tail = torch.randn(rows, 3 * kv_heads * head_dim, generator=generator).to(dtype)
    q, k = qk.split([heads, kv_heads], dim=1)
    v = qkv_tail[:, :kv_heads * head_dim].unflatten(-1, (kv_heads, head_dim))
    cache = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_dim, generator=generator).to(dtype)
    results = []
    for attention in (NativePagedAttention(ops, heads, kv_heads, head_dim, BLOCK_SIZE, max_queries),
                      TorchPagedAttention(heads, kv_heads, head_dim, BLOCK_SIZE)):
        batch.attention = attention.prepare(batch)
        layer_cache = cache.clone()
        with torch.inference_mode():
            out = attention.forward(q, k, v, (layer_cache[0], layer_cache[1]), batch)
        results.append((out, layer_cache))
    (native, native_cache), (reference, reference_cache) = results
    return native, reference, native_cache, reference_cache, batch


STEPS = {
    "decode, one sequence of 1 key": [(0, 1)],
    "decode, contexts 15/16/17": [(14, 1), (15, 1), (16, 1)],
    "decode, long and short": [(299, 1), (47, 1), (0, 1), (16, 1), (200, 1)],
    "mixed: decodes, a prefill, a chunk after cached tokens": [(16, 1), (299, 1), (0, 7), (5, 20)],
    "prefill only": [(0, 17), (0, 3)],
    "verifications among decodes (2 to 16 queries)": [(14, 1), (40, 3), (15, 5), (283, 16), (0, 2)],
    "a verification, then a prefill": [(16, 1), (20, 5), (0, 40)],
    "a long query first, short ones after it": [(0, 20), (30, 4), (7, 1)],
    "turns after cached prefixes (chunked: > 256 rows per KV head)": [(2, 1), (160, 40), (96, 130), (0, 150)],
    "one long prompt, many chunks": [(0, 300)],
}
SHAPES = {"gqa 14/2 d64": (14, 2, 64), "mha 4/4 d32": (4, 4, 32), "gqa 8/1 d80": (8, 1, 80)}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_queries", [MAX_QUERIES, None], ids=["long queries to SDPA", "every query native"])
def test_matches_the_reference(ops, step, shape, dtype, max_queries):
    """Both routings on every build: the op's many-rows paths (bf16 pairs where the CPU has AVX512-BF16,
    float32 elsewhere) and its few-rows path, against the reference."""
    native, reference, native_cache, reference_cache, batch = run_both(ops, STEPS[step], *SHAPES[shape], dtype,
                                                                       max_queries=max_queries)
    assert native.shape == reference.shape and native.dtype == dtype
    assert torch.equal(native_cache, reference_cache)  # every row's K/V written to the same slot
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(native.float(), reference.float(), rtol=tolerance, atol=tolerance)
    if max_queries is not None:  # rows past the op's short queries are the reference's own: equal, not close
        first = NativePagedAttention(ops, *SHAPES[shape], BLOCK_SIZE, max_queries).prepare(batch).first_prefill_token
        assert torch.equal(native[first:batch.num_tokens], reference[first:batch.num_tokens])


def test_long_queries_go_native_only_where_that_path_is_fast(ops):
    for dtype in (torch.float32, torch.bfloat16):
        path = ops.long_query_path(dtype, 64)
        attention = make_attention(dtype)
        assert path in ("bf16-pairs", "float32")
        assert attention.max_queries == (None if path == "bf16-pairs" else MAX_QUERIES)
    assert ops.long_query_path(torch.float32, 80) == "none"  # no many-rows path for this head_dim


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_rows_of_bucketed_steps_are_zero(ops, dtype):
    """Decode-only steps padded to a batch bucket, mixed steps to a token bucket: padding rows write into
    block 0 and attend to nothing."""
    constraints = ShapeConstraints(max_batch_size=8, prefill_token_buckets=(8, 32, 64), decode_batch_buckets=(4, 8))
    for seqs in ([(20, 1), (3, 1), (40, 1)], [(20, 1), (0, 9), (4, 3)]):
        native, reference, native_cache, reference_cache, batch = run_both(ops, seqs, 14, 2, 64, dtype, constraints)
        assert native.shape[0] > batch.num_tokens  # padded
        assert torch.equal(native_cache, reference_cache)
        assert not native[batch.num_tokens:].any()
        torch.testing.assert_close(native.float(), reference.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_decode_rows_attend_to_the_key_written_this_step(ops):
    """A context of one key: softmax over one key is that key's value, exactly (float32)."""
    native, _, native_cache, _, batch = run_both(ops, [(0, 1), (31, 1)], 4, 2, 16, torch.float32)
    slot = int(batch.slot_mapping[0])
    value = native_cache[1].view(-1, 2, 16)[slot]  # [kv_heads, d]: this step's v of the first sequence
    assert torch.allclose(native[0].view(4, 16), value.repeat_interleave(2, dim=0), rtol=0, atol=1e-6)


def test_the_start_up_probe_passes_and_catches_a_wrong_kernel(ops, monkeypatch):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for head_dim in (64, 128, 80):
            assert is_usable(ops, dtype, head_dim)

    class WrongScale:  # the real op with a wrong scale: an answer the probe must refuse
        @staticmethod
        def paged_attention(*args):
            return ops.paged_attention(*args[:-1], args[-1] * 1.5)

    assert not is_usable(WrongScale(), torch.float32)


def make_attention(dtype=torch.float32, heads=14, kv_heads=2):
    from types import SimpleNamespace

    config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64)
    return plugin.tgserve_make_attention(model_config=config, block_size=BLOCK_SIZE, device=torch.device("cpu"),
                                         dtype=dtype)


def test_backend_offers_the_native_attention(ops):
    for dtype in (torch.float32, torch.bfloat16, "float16"):
        assert isinstance(make_attention(dtype), NativePagedAttention)
    assert make_attention(torch.float64) is None  # the op takes float32 / bf16 / fp16 caches only


@pytest.fixture
def fresh_native():
    plugin.native_attention_ops.cache_clear()
    yield
    plugin.native_attention_ops.cache_clear()


def test_failed_build_falls_back_to_the_reference_with_one_log_line(monkeypatch, fresh_native, caplog):
    def no_compiler(*args, **kwargs):
        raise NativeBuildError("no C++ compiler ('c++' not found)")

    monkeypatch.setattr(plugin, "load_ops", no_compiler)
    with caplog.at_level(logging.INFO, logger="tgserve.backends.cpu.plugin"):
        assert make_attention(torch.float32) is None  # the core's default (trylast) answers instead
        assert make_attention(torch.bfloat16) is None  # a second model build in the process: no second line
    why = [r for r in caplog.records if "native paged attention" in r.getMessage()]
    assert len(why) == 1 and why[0].levelno == logging.WARNING
    assert "no C++ compiler ('c++' not found)" in why[0].getMessage()


@pytest.mark.parametrize("env", [plugin.ATTENTION_ENV, plugin.NATIVE_ENV])
def test_native_attention_can_be_turned_off(monkeypatch, fresh_native, caplog, env):
    monkeypatch.setenv(env, "0")
    monkeypatch.setattr(plugin, "load_ops", lambda *a, **k: pytest.fail("built although turned off"))
    with caplog.at_level(logging.INFO, logger="tgserve.backends.cpu.plugin"):
        assert make_attention() is None
        assert make_attention() is None
    assert sum(f"{env}=0" in r.getMessage() for r in caplog.records) == 1


def test_engine_greedy_ids_equal_with_the_native_attention_on_and_off(demo_model_dir, monkeypatch):
    """float32, a small prefill budget so long prompts are chunked beside decodes; batched and alone."""
    from ..core.engine_harness import request, run_all, running_engine

    if shutil.which(COMPILER) is None:
        pytest.skip(f"the native attention needs a C++ compiler ({COMPILER})")
    prompts = [list(range(3, 40)), [5, 6, 7], list(range(100, 170)), [9] * 20]
    results, kinds = {}, {}
    for native in ("1", "0"):
        monkeypatch.setenv(plugin.ATTENTION_ENV, native)
        plugin.native_attention_ops.cache_clear()
        try:
            with running_engine(demo_model_dir, dtype="float32", max_batch_prefill_tokens=24,
                                max_total_tokens=512) as engine:
                kinds[native] = type(engine.runner.attention)
                together = run_all(engine, [request(p, max_new_tokens=24) for p in prompts])
                alone = run_all(engine, [request(prompts[2], max_new_tokens=24)])
        finally:
            plugin.native_attention_ops.cache_clear()
        results[native] = [r.ids for r in together + alone]
    assert kinds == {"1": NativePagedAttention, "0": TorchPagedAttention}
    assert all(len(ids) == 24 for ids in results["1"])
    assert results["1"] == results["0"]
