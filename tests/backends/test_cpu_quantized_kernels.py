"""The cpu backend's packed int8 / int4 weight-only kernels against the core's reference kernel."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tgserve.backends.cpu import weight_only
from tgserve.backends.cpu.weight_only import CpuInt4Kernel, CpuInt8Kernel, make_weight_only_kernels
from tgserve.benchmark.weight_bytes import reachable_tensors, tensor_bytes
from tgserve.core.quantization.weight_only import AffineQuantizedWeight, ReferenceKernel, prepare_with

BF16_TOLERANCE = 2e-2  # relative to the output's scale: bf16 rounds x, scales and y (8 mantissa bits)


def random_weight(out_features: int, in_features: int, bits: int, group_size: int, *, symmetric: bool = False,
                  has_bias: bool = False, has_perm: bool = False, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    num_groups = in_features // group_size
    if symmetric:
        zeros = torch.full((out_features, num_groups), float(2 ** (bits - 1)))
    else:
        zeros = torch.randint(0, 2**bits, (out_features, num_groups), generator=generator).float()
    return AffineQuantizedWeight(
        q=torch.randint(0, 2**bits, (out_features, in_features), generator=generator, dtype=torch.uint8),
        scales=torch.rand(out_features, num_groups, generator=generator) / 40 + 1e-3, zeros=zeros,
        bits=bits, group_size=group_size,
        input_perm=torch.randperm(in_features, generator=generator) if has_perm else None,
        bias=torch.randn(out_features, generator=generator).to(dtype) if has_bias else None)


def assert_matches_reference(kernel, weight: AffineQuantizedWeight, dtype: torch.dtype, x_shape: tuple[int, ...]):
    prepared = kernel.prepare(weight, dtype)
    assert prepared is not None, f"{kernel.name} declined {weight.bits}-bit g{weight.group_size} for {dtype}"
    x = torch.randn(*x_shape, weight.in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        y = kernel.apply(prepared, x)
        expected = ReferenceKernel().apply(ReferenceKernel().prepare(weight, dtype), x)
    assert y.dtype == dtype and y.shape == expected.shape == (*x_shape, weight.out_features)
    scale = expected.float().abs().max().item()
    tolerance = 1e-5 if dtype == torch.float32 else BF16_TOLERANCE
    torch.testing.assert_close(y.float(), expected.float(), rtol=0, atol=tolerance * scale)


KERNEL_OPS = {"cpu-int8": (weight_only.INT8_OP,), "cpu-int4": (weight_only.INT4_PACK_OP, weight_only.INT4_OP)}


def require(kernel_name: str) -> None:
    """Skip where this torch build lacks the kernel's ops (only there: a kernel that is present but wrong
    must fail these tests, not skip them)."""
    missing = [name for name in KERNEL_OPS[kernel_name] if weight_only.aten_op(name) is None]
    if missing:
        pytest.skip(f"{kernel_name} needs torch.ops.aten.{missing[0]} (torch {torch.__version__} lacks it)")


@pytest.mark.parametrize("kernel_name, dtype", [("cpu-int8", torch.float32), ("cpu-int8", torch.bfloat16),
                                                ("cpu-int4", torch.bfloat16)])
def test_kernels_are_offered_where_their_ops_exist(kernel_name, dtype):
    """The start-up probe passes on this CPU: the ops exist, so they must also answer right."""
    require(kernel_name)
    assert weight_only.is_usable(kernel_name, dtype)
    assert kernel_name in [kernel.name for kernel in make_weight_only_kernels(dtype)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 64), (1152, 896), (96, 4864)])
@pytest.mark.parametrize("symmetric, has_bias, has_perm", [(True, False, False), (False, True, True)])
@pytest.mark.parametrize("x_shape", [(1,), (8,), (2, 40)])  # decode rows, a batch, a prefill past the tiling
def test_int8_kernel_matches_reference(dtype, shape, symmetric, has_bias, has_perm, x_shape):
    require("cpu-int8")
    weight = random_weight(*shape, bits=8, group_size=shape[1], symmetric=symmetric, has_bias=has_bias,
                           has_perm=has_perm, dtype=dtype)
    assert_matches_reference(CpuInt8Kernel(), weight, dtype, x_shape)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 64), (4, 128), (4, 256), (4, 512), (4, -1), (3, 128),
                                              (2, 32)])
@pytest.mark.parametrize("shape", [(64, 512), (1152, 1024)])
@pytest.mark.parametrize("symmetric, has_bias, has_perm", [(True, False, False), (False, True, True)])
def test_int4_kernel_matches_reference(bits, group_size, shape, symmetric, has_bias, has_perm):
    require("cpu-int4")
    group_size = shape[1] if group_size == -1 else group_size  # -1: one group per output channel
    weight = random_weight(*shape, bits=bits, group_size=group_size, symmetric=symmetric, has_bias=has_bias,
                           has_perm=has_perm, dtype=torch.bfloat16)
    for x_shape in ((1,), (8,), (3, 5)):
        assert_matches_reference(CpuInt4Kernel(), weight, torch.bfloat16, x_shape)


@pytest.mark.parametrize("kernel, weight, dtype", [
    (CpuInt8Kernel(), random_weight(48, 64, bits=8, group_size=32), torch.float32),  # grouped int8
    (CpuInt8Kernel(), random_weight(48, 64, bits=4, group_size=64), torch.float32),  # not 8-bit
    (CpuInt8Kernel(), random_weight(48, 64, bits=8, group_size=64), torch.float64),  # no such op dtype
    (CpuInt4Kernel(), random_weight(48, 64, bits=8, group_size=32), torch.bfloat16),  # 8-bit codes
    (CpuInt4Kernel(), random_weight(48, 64, bits=4, group_size=16), torch.bfloat16),  # group the op lacks
    (CpuInt4Kernel(), random_weight(48, 80, bits=4, group_size=80), torch.bfloat16),  # per channel, K % 32 != 0
    (CpuInt4Kernel(), random_weight(40, 64, bits=4, group_size=32), torch.bfloat16),  # out_features % 16 != 0
    (CpuInt4Kernel(), random_weight(48, 64, bits=4, group_size=32), torch.float32),  # fp32: slower than reference
])
def test_kernels_decline_weights_they_cannot_take(kernel, weight, dtype):
    assert kernel.prepare(weight, dtype) is None
    chosen, _ = prepare_with((kernel,), weight, dtype)
    assert isinstance(chosen, ReferenceKernel)


def test_weights_stay_packed():
    """Resident bytes per layer against the bf16 weight: int8 <= 0.55x, int4 g128 <= 0.30x; no dense copy."""
    require("cpu-int8")
    require("cpu-int4")
    out_features, in_features = 1152, 896
    bf16_bytes = out_features * in_features * 2
    int8 = CpuInt8Kernel().prepare(random_weight(out_features, in_features, bits=8, group_size=in_features),
                                   torch.bfloat16)
    int4 = CpuInt4Kernel().prepare(random_weight(out_features, in_features, bits=4, group_size=128), torch.bfloat16)
    assert tensor_bytes(reachable_tensors(int8)) <= 0.55 * bf16_bytes
    assert tensor_bytes(reachable_tensors(int4)) <= 0.30 * bf16_bytes


@pytest.fixture
def fresh_probes():
    weight_only.is_usable.cache_clear()
    yield
    weight_only.is_usable.cache_clear()


@pytest.mark.parametrize("missing", [weight_only.INT8_OP, weight_only.INT4_OP, weight_only.INT4_PACK_OP])
def test_missing_op_falls_back_to_the_reference(monkeypatch, fresh_probes, missing):
    """A torch build without the op (older or other platform) offers no such kernel; layers use the reference."""
    real = weight_only.aten_op
    monkeypatch.setattr(weight_only, "aten_op", lambda name: None if name == missing else real(name))
    names = [kernel.name for kernel in make_weight_only_kernels(torch.bfloat16)]
    lost = "cpu-int8" if missing == weight_only.INT8_OP else "cpu-int4"
    assert lost not in names
    weight = random_weight(64, 128, bits=8 if lost == "cpu-int8" else 4, group_size=128 if lost == "cpu-int8" else 32)
    chosen, _ = prepare_with(make_weight_only_kernels(torch.bfloat16), weight, torch.bfloat16)
    assert isinstance(chosen, ReferenceKernel)


@pytest.mark.parametrize("op_name, dtype", [(weight_only.INT8_OP, torch.float32), (weight_only.INT8_OP, torch.bfloat16),
                                           (weight_only.INT4_OP, torch.bfloat16)])
def test_op_that_answers_wrong_here_is_not_offered(monkeypatch, fresh_probes, op_name, dtype):
    """The start-up probe compares each op with the reference on this CPU: a wrong answer declines it."""
    real = weight_only.aten_op

    def off_by_a_little(name):
        op = real(name)
        return (lambda *args: op(*args) * (1.0001 if dtype == torch.float32 else 1.05)) if name == op_name else op

    monkeypatch.setattr(weight_only, "aten_op", off_by_a_little)
    kept = make_weight_only_kernels(dtype)
    assert ("cpu-int8" if op_name == weight_only.INT8_OP else "cpu-int4") not in [k.name for k in kept]


AVX2_SCRIPT = """
import json, torch
from tgserve.backends.cpu import plugin
from tgserve.backends.cpu.weight_only import CpuInt4Kernel, CpuInt8Kernel
from tgserve.core.quantization.quant_config import QuantizationConfig
quantization = QuantizationConfig(method="eetq", is_prequantized=False, bits=8, group_size=-1)
answer = {"capability": torch.backends.cpu.get_cpu_capability(), "isa": plugin.cpu_kernels().isa}
for dtype in ("float32", "bfloat16"):
    method = plugin.tgserve_make_linear_method(quantize="eetq", dtype=dtype, device=torch.device("cpu"),
                                               quantization=quantization)
    answer[dtype] = [kernel.name for kernel in method.kernels]
print("RESULT " + json.dumps(answer))
"""


def test_portable_avx2_path_offers_the_kernels():
    """Under TGSERVE_CPU_ISA=avx2 and torch's AVX2 kernels (an AVX2-only CPU's path) the ops still pass
    the probe: int8 for float32 and bf16 runs, int4 for bf16."""
    require("cpu-int8")
    env = {**os.environ, "TGSERVE_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = subprocess.run([sys.executable, "-c", AVX2_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-2000:]
    answer = json.loads(line[len("RESULT "):])
    assert answer["isa"] == "avx2" and answer["capability"] in ("AVX2", "DEFAULT")
    torch_ops = {dtype: [name for name in answer[dtype] if not name.startswith("cpu-native")]
                 for dtype in ("float32", "bfloat16")}
    assert torch_ops["float32"] == ["cpu-int8"]
    assert torch_ops["bfloat16"] == ["cpu-int8", "cpu-int4"]
    if shutil.which("c++"):  # the native kernels' AVX2 build (-march=haswell) passes its probe too, and comes first
        for dtype in ("float32", "bfloat16"):
            assert answer[dtype][:2] == ["cpu-native-int8", "cpu-native-int4"]


@pytest.mark.parametrize("native", ["1", "0"])
def test_eetq_engine_runs_on_the_int8_kernel(demo_model_dir, monkeypatch, native):
    """`--quantize eetq` on the cpu backend: every linear layer of the built model runs the native int8
    GEMM where it built (a machine with a compiler), and torch's int8 op with the native kernels off."""
    from tgserve.backends.cpu import plugin
    from tgserve.core.layers.linear import Linear

    from ..core.engine_harness import request, run_all, running_engine

    require("cpu-int8")
    if native == "1" and shutil.which("c++") is None:
        pytest.skip("the native kernels need a C++ compiler (c++)")
    monkeypatch.setenv(plugin.NATIVE_ENV, native)
    plugin.native_ops.cache_clear()
    try:
        with running_engine(demo_model_dir, quantize="eetq", dtype="float32") as engine:
            linears = [m for m in engine.runner.model.modules() if isinstance(m, Linear)]
            [done] = run_all(engine, [request([1, 2, 3, 4], max_new_tokens=4)])
    finally:
        plugin.native_ops.cache_clear()
    expected = "cpu-native-int8" if native == "1" else "cpu-int8"
    assert linears and {layer.prepared[0].name for layer in linears} == {expected}
    assert len(done.ids) == 4
