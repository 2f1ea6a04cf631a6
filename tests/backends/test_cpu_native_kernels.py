"""The cpu backend's native weight-only GEMM (backends/cpu/native/) against the core's reference kernel,
its routing (offered before torch's ops; GGUF Q8_0 / Q4_0 / Q4_1 land on it), and its fallback: a build
that fails leaves torch's op kernels serving, with one log line saying why."""
from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tgserve.backends.cpu import native_kernels, plugin
from tgserve.backends.cpu.native_kernels import NativeBuildError
from tgserve.backends.cpu.native_weight_only import (MAX_PACKED_ROWS, NativeInt4Kernel, NativeInt8Kernel,
                                                    has_int8_activations, is_usable)
from tgserve.core.quantization.quant_config import QuantizationConfig
from tgserve.core.quantization.weight_only import AffineQuantizedWeight, ReferenceKernel, prepare_with

from .test_cpu_quantized_kernels import assert_matches_reference

COMPILER = "c++"
ROW_COUNTS = (1, 2, 8, 33, 200)  # decode rows, a decode batch, just past the packed kernel, a prefill
assert 8 < MAX_PACKED_ROWS < 33  # so the row counts above run both of its paths


@pytest.fixture(scope="module")
def ops():
    """The library, built here if no earlier run cached it (~20 s). A machine with a compiler must build it."""
    if shutil.which(COMPILER) is None:
        pytest.skip(f"the native kernels need a C++ compiler ({COMPILER})")
    plugin.native_ops.cache_clear()
    loaded = plugin.native_ops()
    assert loaded is not None, "the native build failed on a machine with a compiler: see the warning logged"
    return loaded


def affine_weight(out_features: int, in_features: int, bits: int, group_size: int, *, symmetric: bool,
                  dtype: torch.dtype, seed: int = 0) -> AffineQuantizedWeight:
    """Random codes, scales and zeros; a ragged last group where group_size does not divide in_features."""
    generator = torch.Generator().manual_seed(seed)
    num_groups = -(-in_features // group_size)
    zeros = (torch.full((out_features, num_groups), float(2 ** (bits - 1))) if symmetric else
             torch.randint(0, 2**bits, (out_features, num_groups), generator=generator).float())
    return AffineQuantizedWeight(
        q=torch.randint(0, 2**bits, (out_features, in_features), generator=generator, dtype=torch.uint8),
        scales=torch.rand(out_features, num_groups, generator=generator) / 40 + 1e-3, zeros=zeros,
        bits=bits, group_size=group_size,
        input_perm=None if symmetric else torch.randperm(in_features, generator=generator),
        bias=None if symmetric else torch.randn(out_features, generator=generator).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])  # False: asymmetric zeros, an input permutation, a bias
def test_native_kernel_matches_reference(ops, dtype, bits, group_size, symmetric):
    # 40 outputs: two full blocks of 16 and a ragged one; per channel over an odd 97 inputs.
    in_features = 97 if group_size == -1 else 256
    weight = affine_weight(40, in_features, bits, in_features if group_size == -1 else group_size,
                           symmetric=symmetric, dtype=dtype)
    kernel = NativeInt8Kernel(ops) if bits == 8 else NativeInt4Kernel(ops)
    for num_rows in ROW_COUNTS:
        assert_matches_reference(kernel, weight, dtype, (num_rows,))
    assert_matches_reference(kernel, weight, dtype, (3, 11))  # [batch, seq, in] inputs keep their leading dims


@pytest.mark.parametrize("bits", [8, 4])
def test_ragged_last_group_and_large_layer(ops, bits):
    """160 inputs in groups of 64 (the last holds 32), and a layer past one 512-row prefill tile."""
    ragged = affine_weight(50, 160, bits, 64, symmetric=False, dtype=torch.float32)
    large = affine_weight(1100, 320, bits, 32, symmetric=False, dtype=torch.bfloat16, seed=3)
    kernel = NativeInt8Kernel(ops) if bits == 8 else NativeInt4Kernel(ops)
    for num_rows in (1, 8, 40):
        assert_matches_reference(kernel, ragged, torch.float32, (num_rows,))
        assert_matches_reference(kernel, large, torch.bfloat16, (num_rows,))


# int8 activations (bf16 / fp16 at 2..MAX_PACKED_ROWS rows on an AVX512-VNNI build) against the exact float32
# result. Each x is rounded to 8 bits per 32 inputs: an element's error is at most absmax / 254 of its
# block, ~0.4% of a Gaussian row's scale; summed over K inputs with random signs, an output's error is
# ~0.3% of the outputs' rms (measured up to ~1%), and of their max (~3x the rms) less. bf16 rounding of x and
# y alone gives ~0.3% (2^-9 per element); the bounds keep the probe's 2e-2 of the max and add an rms bound.
INT8_ACTIVATIONS_MAX_ERROR = 2e-2  # of the exact output's largest magnitude (matches_reference's bf16 bound)
INT8_ACTIVATIONS_RMS_ERROR = 1.5e-2  # of the exact output's rms


@pytest.fixture(scope="module")
def vnni_ops(ops):
    if not has_int8_activations(ops):
        pytest.skip("int8 activations need a CPU with AVX512-VNNI, AVX512BW and AVX512-VBMI (Sapphire Rapids, Zen 4/5)")
    return ops


def exact_output(weight: AffineQuantizedWeight, x: torch.Tensor) -> torch.Tensor:
    """The reference in float32 for bf16 x: x as given, the weight and bias unrounded."""
    weight = dataclasses.replace(weight, bias=None if weight.bias is None else weight.bias.float())
    return ReferenceKernel().apply(ReferenceKernel().prepare(weight, torch.float32), x.float())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])  # False: asymmetric zeros, an input permutation, a bias
def test_int8_activations_stay_within_activation_rounding_of_the_exact_result(vnni_ops, bits, group_size, symmetric):
    in_features = 95 if group_size == -1 else 256  # per channel over an odd K: partial last loads (97 above)
    weight = affine_weight(40, in_features, bits, in_features if group_size == -1 else group_size,
                           symmetric=symmetric, dtype=torch.bfloat16)  # 40 outputs: a ragged last block
    kernel_class = NativeInt8Kernel if bits == 8 else NativeInt4Kernel
    kernel, plain = kernel_class(vnni_ops), kernel_class(vnni_ops, int8_activations=False)
    assert "int8 activations" in kernel.description and plain.description == plain.name
    prepared, plain_prepared = kernel.prepare(weight, torch.bfloat16), plain.prepare(weight, torch.bfloat16)
    generator = torch.Generator().manual_seed(2)
    for num_rows in (1, 2, 8, 33):
        x = torch.randn(num_rows, in_features, generator=generator).to(torch.bfloat16)
        with torch.no_grad():
            y = kernel.apply(prepared, x)
            unrounded = plain.apply(plain_prepared, x)
        exact = exact_output(weight, x)
        error = y.float() - exact
        assert y.dtype == torch.bfloat16 and y.shape == (num_rows, 40)
        assert error.abs().max() <= INT8_ACTIVATIONS_MAX_ERROR * exact.abs().max()
        assert error.pow(2).mean().sqrt() <= INT8_ACTIVATIONS_RMS_ERROR * exact.pow(2).mean().sqrt()
        if num_rows <= MAX_PACKED_ROWS:  # the int8 path ran (it rounds x, so its answer differs)
            assert not torch.equal(y, unrounded)
        else:  # a prefill's tiles never round x
            assert torch.equal(y, unrounded)


@pytest.mark.parametrize("bits", [8, 4])
def test_float32_never_takes_int8_activations(vnni_ops, bits):
    """float32 is the project's exactness oracle: the same bits with the path on and off."""
    weight = affine_weight(40, 256, bits, 32, symmetric=False, dtype=torch.float32)
    kernel_class = NativeInt8Kernel if bits == 8 else NativeInt4Kernel
    kernel, plain = kernel_class(vnni_ops), kernel_class(vnni_ops, int8_activations=False)
    on, off = kernel.prepare(weight, torch.float32), plain.prepare(weight, torch.float32)
    for num_rows in (1, 2, 8):
        x = torch.randn(num_rows, 256, generator=torch.Generator().manual_seed(num_rows))
        assert torch.equal(kernel.apply(on, x), plain.apply(off, x))


@pytest.mark.parametrize("bits", [8, 4])
def test_a_row_gets_the_same_answer_alone_and_in_a_batch(vnni_ops, bits):
    """Each row's activations are rounded on their own: a sequence's output does not depend on its batch."""
    weight = affine_weight(40, 256, bits, 32, symmetric=False, dtype=torch.bfloat16)
    kernel = (NativeInt8Kernel if bits == 8 else NativeInt4Kernel)(vnni_ops)
    prepared = kernel.prepare(weight, torch.bfloat16)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    batch = kernel.apply(prepared, x)
    for row in range(5):
        assert torch.equal(kernel.apply(prepared, x[row:row + 1]), batch[row:row + 1])


def test_int8_activations_pass_the_start_up_probe_and_can_be_turned_off(vnni_ops, monkeypatch, caplog):
    for name in (NativeInt8Kernel.name, NativeInt4Kernel.name):
        assert is_usable(name, torch.bfloat16, vnni_ops, True)
    with caplog.at_level(logging.INFO, logger="tgserve.backends.cpu.plugin"):
        quantized_method(torch.bfloat16)
        monkeypatch.setenv(plugin.INT8_ACTIVATIONS_ENV, "0")
        kernels = quantized_method(torch.bfloat16).kernels
    lines = [r.getMessage() for r in caplog.records if "weight-only kernels for" in r.getMessage()]
    assert "cpu-native-int4 (int8 activations" in lines[0] and "int8 activations" not in lines[1]
    assert not any(getattr(kernel, "int8_activations", False) for kernel in quantized_method(torch.float32).kernels)
    assert not any(getattr(kernel, "int8_activations", False) for kernel in kernels)


def test_native_kernels_decline_what_they_cannot_take(ops):
    odd_groups = affine_weight(32, 20, 4, 5, symmetric=True, dtype=torch.float32)  # nibble pairs would straddle
    assert NativeInt4Kernel(ops).prepare(odd_groups, torch.float32) is None
    assert NativeInt8Kernel(ops).prepare(affine_weight(32, 64, 4, 32, symmetric=True, dtype=torch.float32),
                                         torch.float32) is None
    assert NativeInt4Kernel(ops).prepare(affine_weight(32, 64, 8, 32, symmetric=True, dtype=torch.float32),
                                         torch.float32) is None
    assert NativeInt8Kernel(ops).prepare(affine_weight(32, 64, 8, 32, symmetric=True, dtype=torch.float64),
                                         torch.float64) is None


def test_packed_weight_bytes(ops):
    """Resident bytes against the bf16 weight: int8 <= 0.55x, int4 g128 <= 0.30x (issue 12's limits)."""
    from tgserve.benchmark.weight_bytes import reachable_tensors, tensor_bytes

    bf16_bytes = 1152 * 896 * 2
    int8 = NativeInt8Kernel(ops).prepare(affine_weight(1152, 896, 8, 896, symmetric=True, dtype=torch.bfloat16),
                                         torch.bfloat16)
    int4 = NativeInt4Kernel(ops).prepare(affine_weight(1152, 896, 4, 128, symmetric=True, dtype=torch.bfloat16),
                                         torch.bfloat16)
    assert tensor_bytes(reachable_tensors(int8)) <= 0.55 * bf16_bytes
    assert tensor_bytes(reachable_tensors(int4)) <= 0.30 * bf16_bytes


def quantized_method(dtype: torch.dtype):
    gguf = QuantizationConfig(method="gguf", bits=4, group_size=32, is_prequantized=True)
    return plugin.tgserve_make_linear_method(quantize=None, dtype=dtype, device=torch.device("cpu"),
                                             quantization=gguf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_offers_native_kernels_first_and_gguf_types_land_on_them(ops, dtype):
    """Q8_0 (int8, group 32, symmetric), Q4_0 (zero 8) and Q4_1 (a min: any zero) take the native kernels."""
    kernels = quantized_method(dtype).kernels
    assert [kernel.name for kernel in kernels[:2]] == ["cpu-native-int8", "cpu-native-int4"]
    for bits, symmetric, expected in ((8, True, "cpu-native-int8"), (4, True, "cpu-native-int4"),
                                      (4, False, "cpu-native-int4")):
        chosen, _ = prepare_with(kernels, affine_weight(64, 128, bits, 32, symmetric=symmetric, dtype=dtype), dtype)
        assert chosen.name == expected


@pytest.fixture
def fresh_native(monkeypatch):
    plugin.native_ops.cache_clear()
    yield
    plugin.native_ops.cache_clear()


def test_failed_build_falls_back_to_torch_ops_with_one_log_line(monkeypatch, fresh_native, caplog):
    def no_compiler(*args, **kwargs):
        raise NativeBuildError("no C++ compiler ('c++' not found)")

    monkeypatch.setattr(plugin, "load_ops", no_compiler)
    with caplog.at_level(logging.INFO, logger="tgserve.backends.cpu.plugin"):
        kernels = quantized_method(torch.bfloat16).kernels
        quantized_method(torch.float32)  # a second model load in the process: no second line
    names = [kernel.name for kernel in kernels]
    assert not any(name.startswith("cpu-native") for name in names)
    assert "cpu-int8" in names  # torch's op kernels serve (where this torch build has their ops)
    why = [r for r in caplog.records if "native weight-only kernels" in r.getMessage()]
    assert len(why) == 1 and why[0].levelno == logging.WARNING
    assert "no C++ compiler ('c++' not found)" in why[0].getMessage()


def test_native_kernels_can_be_turned_off(monkeypatch, fresh_native, caplog):
    monkeypatch.setenv(plugin.NATIVE_ENV, "0")
    monkeypatch.setattr(plugin, "load_ops", lambda *a, **k: pytest.fail("built although turned off"))
    with caplog.at_level(logging.INFO, logger="tgserve.backends.cpu.plugin"):
        names = [kernel.name for kernel in quantized_method(torch.float32).kernels]
    assert not any(name.startswith("cpu-native") for name in names)
    assert sum("TGSERVE_CPU_NATIVE_KERNELS=0" in r.getMessage() for r in caplog.records) == 1


def test_build_errors_are_named(monkeypatch, tmp_path):
    """No compiler, and source that does not compile: a NativeBuildError saying which, nothing loaded."""
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(NativeBuildError, match="no C\\+\\+ compiler"):
        native_kernels.load_ops(tmp_path)
    monkeypatch.delenv("CXX")
    if shutil.which(COMPILER) is None:
        return
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native_kernels, "SOURCE", broken)
    monkeypatch.setattr(native_kernels, "LIBRARY_NAME", "tgserve_broken_test")
    with pytest.raises(NativeBuildError, match="failed"):
        native_kernels.load_ops(tmp_path / "cache")


TINY_SOURCE = """
#include <torch/library.h>
#include <ATen/core/Tensor.h>
at::Tensor same(const at::Tensor& x) { return x; }
TORCH_LIBRARY(tgserve_lock_test, m) { m.def("same(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(tgserve_lock_test, CPU, m) { m.impl("same", &same); }
"""
BUILD_AND_PROBE = """
import sys, torch
from pathlib import Path
from tgserve.backends.cpu import native_kernels
native_kernels.SOURCE, native_kernels.LIBRARY_NAME = Path(sys.argv[2]), "tgserve_lock_test"
_, build_dir, _ = native_kernels.load_ops(Path(sys.argv[1]))
assert torch.ops.tgserve_lock_test.same(torch.ones(2)).tolist() == [1.0, 1.0]
print(build_dir)
"""


def test_two_processes_building_at_once_both_load_one_build(tmp_path):
    """A fresh cache and two processes starting together (tests run servers in parallel): one builds
    under the lock, the other waits and loads the same library (a tiny source: the lock is what is tested)."""
    if shutil.which(COMPILER) is None:
        pytest.skip(f"the native kernels need a C++ compiler ({COMPILER})")
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    runs = [subprocess.Popen([sys.executable, "-c", BUILD_AND_PROBE, str(tmp_path / "cache"), str(source)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-2000:]
    build_dirs = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(build_dirs) == 1 and len(list(Path(next(iter(build_dirs))).glob("*.so"))) == 1


def test_a_build_is_named_by_its_source_and_the_headers_beside_it(tmp_path):
    """Editing a shared header (native/exp_poly.h) must rebuild every library that includes it."""
    from tgserve.backends.cpu.native_kernels import cache_key

    source, header = tmp_path / "kernel.cpp", tmp_path / "shared.h"
    source.write_text('#include "shared.h"\n')
    header.write_text("inline int one() { return 1; }\n")
    before = cache_key("avx2", source)
    assert cache_key("avx2", source) == before  # stable
    header.write_text("inline int one() { return 2 - 1; }\n")
    assert cache_key("avx2", source) != before
