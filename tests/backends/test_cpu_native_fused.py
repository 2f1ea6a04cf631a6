"""The cpu backend's fused norm and activation (backends/cpu/native/fused_elementwise.cpp) against the core's
TorchFusedOps: float32 to summation order, bf16 / fp16 to one rounding, odd widths, one to many rows,
rows with a stride; the inputs it hands back to the reference; its switches; the fallback when the build is
refused; and greedy ids through the engine with it on and off."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from tgserve.backends.cpu import plugin
from tgserve.backends.cpu.native_fused import NativeFusedOps, is_usable
from tgserve.backends.cpu.native_kernels import NativeBuildError
from tgserve.core.layers.fused_ops import TorchFusedOps

COMPILER = "c++"
CPU = torch.device("cpu")
ROW_COUNTS = (1, 2, 8, 33, 300)  # decode rows, decode batches, a prefill chunk spread over the thread pool
WIDTHS = (1, 7, 37, 896)  # odd sizes (no whole vector), and Qwen2-0.5B's hidden size
# Of the reference's largest magnitude. float32: summation order and rsqrt vs 1 / sqrt; bf16 / fp16: one
# rounding of an output where the statistic lands on the other side of a rounding boundary.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.fixture(scope="module")
def ops():
    """The library, built here if no earlier run cached it (~15 s). A machine with a compiler must build it."""
    if shutil.which(COMPILER) is None:
        pytest.skip(f"the native fused ops need a C++ compiler ({COMPILER})")
    plugin.native_fused_ops.cache_clear()
    loaded = plugin.native_fused_ops()
    assert loaded is not None, "the native build failed on a machine with a compiler: see the warning logged"
    return loaded


def assert_close(native: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    assert native.dtype == reference.dtype == dtype and native.shape == reference.shape
    bound = TOLERANCE[dtype] * float(reference.float().abs().max())
    assert float((native.float() - reference.float()).abs().max()) <= bound


def rows(num_rows: int, width: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(num_rows, width, generator=generator)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", WIDTHS)
def test_norms_match_the_reference(ops, dtype, width):
    native, reference = NativeFusedOps(ops), TorchFusedOps()
    weight = (torch.rand(width, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)
    for num_rows in ROW_COUNTS:
        x, residual = rows(num_rows, width, dtype, 2), rows(num_rows, width, dtype, 3, scale=4.0)
        assert_close(native.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), dtype)
        normed, summed = native.add_rms_norm(x, residual, weight, 1e-5)
        expected_normed, expected_sum = reference.add_rms_norm(x, residual, weight, 1e-5)
        assert torch.equal(summed, expected_sum)  # one rounding of one add: exact in every dtype
        assert_close(normed, expected_normed, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", WIDTHS)
def test_silu_and_mul_matches_the_reference(ops, dtype, width):
    native, reference = NativeFusedOps(ops), TorchFusedOps()
    for num_rows in ROW_COUNTS:
        gate_up = rows(num_rows, 2 * width, dtype, 4, scale=6.0)  # both tails of the sigmoid
        assert_close(native.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "head_dim"), [(16, 64), (3, 2), (24, 128)])
def test_rotary_equals_the_reference_bit_for_bit(ops, dtype, heads, head_dim):
    """Real tables (RotaryEmbedding, positions in any order) on the model's strided q/k view of a qkv row;
    the same roundings as HF's `x * cos + rotate_half(x) * sin`, so equal, not close, in every dtype."""
    from tgserve.core.layers.rotary import RotaryEmbedding

    native, reference = NativeFusedOps(ops), TorchFusedOps()
    rotary = RotaryEmbedding(head_dim, 4096, 1e6, None, dtype, CPU)
    for num_rows in ROW_COUNTS:
        positions = torch.randperm(4096, generator=torch.Generator().manual_seed(num_rows))[:num_rows]
        qkv = rows(num_rows, (heads + 2) * head_dim, dtype, num_rows, scale=3.0)
        qk = qkv[:, :(heads + 1) * head_dim].unflatten(-1, (heads + 1, head_dim))
        got, expected = native.rotary(rotary.lookup(positions), qk), reference.rotary(rotary.lookup(positions), qk)
        assert got.dtype == dtype and got.shape == expected.shape and torch.equal(got, expected)


def test_extreme_gates_stay_finite(ops):
    """exp is clamped in the kernel: gates far past float32's exp range give silu's limits, 0 and g."""
    gate_up = torch.tensor([[-1000.0, -90.0, 0.0, 90.0, 1000.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    out = NativeFusedOps(ops).silu_and_mul(gate_up)
    assert torch.allclose(out, TorchFusedOps().silu_and_mul(gate_up), rtol=1e-6, atol=1e-30)


def test_strided_rows_and_the_inputs_the_op_does_not_take(ops):
    """Rows with a stride (a slice of a wider tensor) run native; float64 and a 3-d input go to the reference."""
    native, reference = NativeFusedOps(ops), TorchFusedOps()
    wide = rows(5, 64, torch.float32, 5)
    x, residual, weight = wide[:, :37], wide[:, 20:57], torch.rand(37) + 0.5
    expected = reference.add_rms_norm(x, residual, weight, 1e-6)
    for got, want in zip(native.add_rms_norm(x, residual, weight, 1e-6), expected):
        assert_close(got, want, torch.float32)
    assert_close(native.silu_and_mul(wide[:, :40]), reference.silu_and_mul(wide[:, :40]), torch.float32)
    for x, weight in ((rows(3, 9, torch.float64, 6), torch.rand(9, dtype=torch.float64)),
                      (rows(6, 9, torch.float32, 6).view(2, 3, 9), torch.rand(9))):
        assert torch.equal(native.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
        expected = reference.add_rms_norm(x, x, weight, 1e-6)
        assert all(map(torch.equal, native.add_rms_norm(x, x, weight, 1e-6), expected))
        assert torch.equal(native.silu_and_mul(x[..., :8]), reference.silu_and_mul(x[..., :8]))


def test_the_start_up_probe_passes_and_catches_a_wrong_kernel(ops):
    assert is_usable(ops, torch.float32) and is_usable(ops, torch.bfloat16)

    class Wrong:
        rms_norm, add_rms_norm, rotary = ops.rms_norm, ops.add_rms_norm, ops.rotary

        @staticmethod
        def silu_and_mul(gate_up):
            return ops.silu_and_mul(gate_up) * 1.01

    class WrongRotary:  # the tables swapped: a rotation the wrong way
        rms_norm, add_rms_norm, silu_and_mul = ops.rms_norm, ops.add_rms_norm, ops.silu_and_mul

        @staticmethod
        def rotary(x, cos, signed_sin):
            return ops.rotary(x, signed_sin, cos)

    assert not is_usable(Wrong(), torch.float32)
    assert not is_usable(WrongRotary(), torch.float32)


def make_fused_ops(dtype=torch.float32):
    return plugin.tgserve_make_fused_ops(dtype=dtype, device=CPU)


def test_backend_offers_the_native_ops(ops):
    for dtype in (torch.float32, torch.bfloat16, "float16"):
        assert isinstance(make_fused_ops(dtype), NativeFusedOps)
    assert make_fused_ops(torch.float64) is None  # the core's reference (trylast) answers instead


@pytest.fixture
def fresh_native():
    plugin.native_fused_ops.cache_clear()
    yield
    plugin.native_fused_ops.cache_clear()


def test_failed_build_falls_back_to_the_reference_with_one_log_line(monkeypatch, fresh_native, caplog):
    def no_compiler(*args, **kwargs):
        raise NativeBuildError("no C++ compiler ('c++' not found)")

    monkeypatch.setattr(plugin, "load_ops", no_compiler)
    with caplog.at_level(logging.INFO, logger="tgserve.backends.cpu.plugin"):
        assert make_fused_ops(torch.float32) is None
        assert make_fused_ops(torch.bfloat16) is None  # a second model build in the process: no second line
    why = [r for r in caplog.records if "native fused norm and activation" in r.getMessage()]
    assert len(why) == 1 and why[0].levelno == logging.WARNING
    assert "no C++ compiler ('c++' not found)" in why[0].getMessage()


@pytest.mark.parametrize("env", [plugin.FUSED_ENV, plugin.NATIVE_ENV])
def test_native_fused_ops_can_be_turned_off(monkeypatch, fresh_native, caplog, env):
    monkeypatch.setenv(env, "0")
    monkeypatch.setattr(plugin, "load_ops", lambda *a, **k: pytest.fail("built although turned off"))
    with caplog.at_level(logging.INFO, logger="tgserve.backends.cpu.plugin"):
        assert make_fused_ops() is None
        assert make_fused_ops() is None
    assert sum(f"{env}=0" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_greedy_ids_equal_with_the_native_ops_on_and_off(demo_model_dir, monkeypatch, dtype):
    """A small prefill budget so long prompts are chunked beside decodes; batched and alone. bf16 may
    differ by a rounding, so there the first tokens (where the demo model's logits are far apart) must agree."""
    from ..core.engine_harness import request, run_all, running_engine

    if shutil.which(COMPILER) is None:
        pytest.skip(f"the native fused ops need a C++ compiler ({COMPILER})")
    prompts = [list(range(3, 40)), [5, 6, 7], list(range(100, 170)), [9] * 20]
    results, kinds = {}, {}
    for native in ("1", "0"):
        monkeypatch.setenv(plugin.FUSED_ENV, native)
        plugin.native_fused_ops.cache_clear()
        try:
            with running_engine(demo_model_dir, dtype=dtype, max_batch_prefill_tokens=24,
                                max_total_tokens=512) as engine:
                kinds[native] = type(engine.runner.model.layers[0].fused_ops)
                together = run_all(engine, [request(p, max_new_tokens=24) for p in prompts])
                alone = run_all(engine, [request(prompts[2], max_new_tokens=24)])
        finally:
            plugin.native_fused_ops.cache_clear()
        results[native] = [r.ids for r in together + alone]
    assert kinds == {"1": NativeFusedOps, "0": TorchFusedOps}
    assert all(len(ids) == 24 for ids in results["1"])
    if dtype == "float32":
        assert results["1"] == results["0"]
    else:
        assert [ids[:4] for ids in results["1"]] == [ids[:4] for ids in results["0"]]
