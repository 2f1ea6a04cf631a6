"""The cpu backend's native bf16-weight GEMM (backends/cpu/native/bf16_gemm.cpp) against float32 F.linear on the
same weights, its packing, its routing (bf16 where oneDNN has no bf16 path: AVX2-only CPUs and the forced AVX2
path), and its fallback: a build that fails leaves F.linear serving, with one log line saying why.

scripts/test.sh runs this file again under TGSERVE_CPU_ISA=avx2, so the AVX2 build (-march=haswell, 16-output
blocks) is tested on any CPU as well as this CPU's own (32-output blocks where it has AVX-512)."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from tgserve.backends.cpu import host, kernels, plugin
from tgserve.backends.cpu.native_bf16_linear import NativeBf16LinearMethod, is_usable, pack_weight
from tgserve.backends.cpu.native_kernels import NativeBuildError
from tgserve.core.layers.linear import LinearMethod, linear_from_dense

COMPILER = "c++"
# (out, in): ragged blocks and tiny layers, a k loop shorter than its unrolling, Qwen2-0.5B's down_proj inputs.
SHAPES = [(37, 19), (1, 5), (16, 16), (100, 896), (1000, 33), (48, 4864)]
# Every row-tile remainder up to 8 (the AVX-512 build's widest tile), a decode batch, and prefill-sized calls.
ROW_COUNTS = (*range(1, 10), 16, 33, 128, 0)
ZEN3 = ({"avx2", "fma", "f16c"}, False)  # CPU flags, oneDNN's bf16 answer: AVX2 only, no oneDNN bf16 path
SAPPHIRE_RAPIDS_ONEDNN_AVX2 = ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, False)  # ONEDNN_MAX_CPU_ISA=AVX2
ZEN5 = ({"avx2", "avx512f", "avx512bw", "avx512_bf16"}, True)


@pytest.fixture(scope="module")
def ops():
    """The library, built here if no earlier run cached it (~15 s). A machine with a compiler must build it."""
    if shutil.which(COMPILER) is None:
        pytest.skip(f"the native kernels need a C++ compiler ({COMPILER})")
    plugin.native_bf16_ops.cache_clear()
    loaded = plugin.native_bf16_ops()
    assert loaded is not None, "the native build failed on a machine with a compiler: see the warning logged"
    return loaded


def random_layer(out_features: int, in_features: int, has_bias: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=generator).to(torch.bfloat16) if has_bias else None
    return weight, bias, generator


@pytest.mark.parametrize("out_features, in_features", SHAPES)
@pytest.mark.parametrize("has_bias", [True, False])
def test_bf16_rows_match_f_linear_within_one_rounding(ops, out_features, in_features, has_bias):
    """bf16 x: the float32 sum of the same products, rounded to bf16 once (F.linear's bf16 answer up to
    summation order), for every row count."""
    weight, bias, generator = random_layer(out_features, in_features, has_bias)
    layer = linear_from_dense(NativeBf16LinearMethod(ops), weight, bias)
    for num_rows in ROW_COUNTS:
        x = torch.randn(num_rows, in_features, generator=generator).to(torch.bfloat16)
        with torch.inference_mode():
            y = layer(x)
            exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
        assert y.dtype == torch.bfloat16 and y.shape == (num_rows, out_features)
        # One bf16 rounding (2^-9 of the value) plus float32 summation error over in_features products.
        bound = exact.abs() * 2**-8 + 1e-5 * in_features * (x.double().abs() @ weight.double().abs().T)
        assert ((y.double() - exact).abs() <= bound).all(), (num_rows, (y.double() - exact).abs().max())


def test_a_long_prefill_takes_several_passes_over_the_weight(ops):
    """2^20 / in_features rows per pass (64 here): 150 rows are three passes, the last one ragged; each row
    gets a decode row's answer, up to summation order (a lone row sums its inputs in 4 interleaved chains)."""
    weight, bias, generator = random_layer(40, 16384, True, seed=3)
    layer = linear_from_dense(NativeBf16LinearMethod(ops), weight, bias)
    x = torch.randn(150, 16384, generator=generator)
    with torch.inference_mode():
        y = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in (0, 63, 64, 127, 128, 149)])
    exact = F.linear(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(y[[0, 63, 64, 127, 128, 149]], alone, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("out_features, in_features", SHAPES)
def test_float32_rows_are_exact_float32_sums(ops, out_features, in_features):
    """float32 x (bf16 weights kept, activations not rounded): float32 in, float32 out, no rounding to bf16."""
    weight, bias, generator = random_layer(out_features, in_features, True, seed=1)
    layer = linear_from_dense(NativeBf16LinearMethod(ops), weight, bias)
    for num_rows in (1, 5, 33):
        x = torch.randn(num_rows, in_features, generator=generator)
        with torch.inference_mode():
            y = layer(x)
        exact = F.linear(x.double(), weight.double(), bias.double())
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5 * in_features ** 0.5)


def test_leading_dims_and_a_row_alone_or_in_a_batch(ops):
    """[..., in] in, [..., out] out; a row's answer is the same alone or in a batch (up to summation order)."""
    weight, bias, generator = random_layer(70, 64, True, seed=2)
    layer = linear_from_dense(NativeBf16LinearMethod(ops), weight, bias)
    x = torch.randn(3, 5, 64, generator=generator).to(torch.bfloat16)
    with torch.inference_mode():
        batch = layer(x)
        alone = torch.stack([layer(x[i, j:j + 1])[0] for i in range(3) for j in range(5)]).view(3, 5, 70)
    assert batch.shape == (3, 5, 70)
    torch.testing.assert_close(batch, alone, rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_packing_pairs_output_i_with_output_half_a_block_later(block_size):
    weight = torch.arange(3 * block_size * 7, dtype=torch.float32).view(-1, 7)[:2 * block_size + 3].to(torch.bfloat16)
    packed = pack_weight(weight, block_size)
    lanes = block_size // 2
    assert packed.shape == (3, 7, block_size) and packed.dtype == torch.bfloat16
    for block, k, i in ((0, 0, 0), (1, 3, lanes - 1), (2, 6, 1)):
        assert packed[block, k, 2 * i] == weight[block * block_size + i, k]
        second = block * block_size + lanes + i
        assert packed[block, k, 2 * i + 1] == (weight[second, k] if second < weight.shape[0] else 0)


def test_kernel_refuses_what_does_not_fit(ops):
    method = NativeBf16LinearMethod(ops)
    packed, _, out_features = method.prepare({"weight": torch.ones(40, 24, dtype=torch.bfloat16)})
    with pytest.raises(RuntimeError, match="inputs"):
        ops.bf16_linear(torch.ones(2, 25, dtype=torch.bfloat16), packed, None, out_features)
    with pytest.raises(RuntimeError, match="bias"):
        ops.bf16_linear(torch.ones(2, 24, dtype=torch.bfloat16), packed, torch.ones(40, dtype=torch.bfloat16),
                        out_features)
    with pytest.raises(RuntimeError, match="float32 or bf16"):
        ops.bf16_linear(torch.ones(2, 24, dtype=torch.float16), packed, None, out_features)
    with pytest.raises(RuntimeError, match="N does not match"):
        ops.bf16_linear(torch.ones(2, 24), packed, None, out_features + method.block_size)


def test_start_up_probe_passes(ops):
    assert is_usable(ops)


@pytest.fixture
def host_facts(monkeypatch):
    """`host_facts(facts)` makes the plugin decide as on a CPU with those flags and oneDNN bf16 answer."""

    def set_facts(facts) -> None:
        monkeypatch.delenv("TGSERVE_CPU_ISA", raising=False)
        monkeypatch.setattr(host, "cpu_flags", lambda: facts[0])
        monkeypatch.setattr(kernels, "_onednn_has_bf16", lambda: facts[1])
        plugin.cpu_kernels.cache_clear()

    yield set_facts
    plugin.cpu_kernels.cache_clear()


def make_linear_method(dtype, quantization=None):
    return plugin.tgserve_make_linear_method(quantize=None, quantization=quantization, dtype=dtype,
                                             device=torch.device("cpu"))


def native_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "bfloat16 linears on this CPU" in r.getMessage()]


@pytest.mark.parametrize("facts", [ZEN3, SAPPHIRE_RAPIDS_ONEDNN_AVX2], ids=["zen3", "spr-onednn-avx2"])
def test_bf16_without_a_onednn_bf16_path_takes_the_native_method_and_says_so(ops, host_facts, caplog, facts):
    host_facts(facts)
    with caplog.at_level(logging.INFO, logger="tgserve.backends.cpu.plugin"):
        method = make_linear_method(torch.bfloat16)
        float32 = make_linear_method("float32")
    assert isinstance(method, NativeBf16LinearMethod)
    assert not isinstance(float32, NativeBf16LinearMethod)  # float32 keeps oneDNN's packed fp32 (or F.linear)
    (line,) = native_lines(caplog)
    assert "oneDNN has no bf16 path" in line.getMessage() and "cpu-native-bf16" in line.getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_forced_avx2_path_takes_the_native_method(ops, monkeypatch):
    monkeypatch.setenv("TGSERVE_CPU_ISA", "avx2")
    plugin.cpu_kernels.cache_clear()
    try:
        assert isinstance(make_linear_method("bfloat16"), NativeBf16LinearMethod)
    finally:
        plugin.cpu_kernels.cache_clear()


def test_quantized_formats_keep_the_native_method_for_float_layers(ops, host_facts):
    from tgserve.core.quantization.quant_config import resolve_quantization

    host_facts(ZEN3)
    method = make_linear_method(torch.bfloat16, resolve_quantization("eetq", {}))
    assert method.name == "eetq" and isinstance(method.dense, NativeBf16LinearMethod)


def test_onednn_bf16_cpus_keep_onednn(host_facts, caplog):
    host_facts(ZEN5)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without mkldnn")
    with caplog.at_level(logging.INFO, logger="tgserve.backends.cpu.plugin"):
        method = make_linear_method(torch.bfloat16)
    assert not isinstance(method, NativeBf16LinearMethod) and not native_lines(caplog)


@pytest.fixture
def fresh_native(monkeypatch):
    plugin.native_bf16_ops.cache_clear()
    yield
    plugin.native_bf16_ops.cache_clear()


def test_failed_build_falls_back_to_f_linear_with_one_log_line(monkeypatch, host_facts, fresh_native, caplog):
    def no_compiler(*args, **kwargs):
        raise NativeBuildError("no C++ compiler ('c++' not found)")

    host_facts(ZEN3)
    monkeypatch.setattr(plugin, "load_ops", no_compiler)
    with caplog.at_level(logging.INFO, logger="tgserve.backends.cpu.plugin"):
        method = make_linear_method(torch.bfloat16)
        make_linear_method(torch.bfloat16)  # a second model load in the process: no second line
    assert method is None  # the core's reference, F.linear
    (line,) = [r for r in caplog.records if "native bf16 GEMM" in r.getMessage()]
    assert line.levelno == logging.WARNING and "no C++ compiler ('c++' not found)" in line.getMessage()
    assert "bfloat16 runs through a slower path on this CPU" in line.getMessage()
    assert len([r for r in caplog.records if r.levelno >= logging.INFO]) == 1
    weight, bias, generator = random_layer(24, 16, True)
    x = torch.randn(3, 16, generator=generator).to(torch.bfloat16)
    torch.testing.assert_close(linear_from_dense(LinearMethod(), weight, bias)(x),
                               F.linear(x, weight, bias))


def test_native_kernels_off_leaves_f_linear(monkeypatch, host_facts, fresh_native, caplog):
    host_facts(ZEN3)
    monkeypatch.setenv(plugin.NATIVE_ENV, "0")
    monkeypatch.setattr(plugin, "load_ops", lambda *a, **k: pytest.fail("built although turned off"))
    with caplog.at_level(logging.INFO, logger="tgserve.backends.cpu.plugin"):
        assert make_linear_method(torch.bfloat16) is None
    assert sum("TGSERVE_CPU_NATIVE_KERNELS=0" in r.getMessage() for r in caplog.records) == 1
