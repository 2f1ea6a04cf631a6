"""The GPU backends' Triton weight-only kernels against the core's reference kernel, on the CPU.

Triton runs kernels on CPU tensors only in its interpreter, chosen when `@triton.jit` decorates a
function (triton.knobs.runtime.interpret reads TRITON_INTERPRET then; triton 3.0-3.2 read the variable
there too). So `interpreted` loads a private copy of backends/cuda/triton_weight_only.py with
TRITON_INTERPRET=1 set for this module's tests: whatever else this session imported stays as it was.
The cuda / rocm hook (which kernels a quantized method gets after their start-up check, and the
fallback without triton) is checked with that interpreted copy standing in for the real module.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (the cuda / rocm / dev extras)")

from tgserve.backends.cuda import kernel_check  # noqa: E402
from tgserve.backends.cuda import plugin as cuda_plugin  # noqa: E402
from tgserve.backends.cuda import torch_gpu  # noqa: E402
from tgserve.backends.cuda import triton_weight_only  # noqa: E402  (compiled for real GPUs below, not run)
from tgserve.backends.rocm import plugin as rocm_plugin  # noqa: E402
from tgserve.core.quantization.quant_config import QuantizationConfig  # noqa: E402
from tgserve.core.quantization.weight_only import AffineQuantizedWeight, ReferenceKernel  # noqa: E402

TRITON_VERSION = tuple(int(part) for part in triton_weight_only.triton.__version__.split(".")[:2])
BF16_TOLERANCE = 2e-2  # of the output's largest value: bf16 rounds x, the dequantized tile and y
FP32_TOLERANCE = 1e-5
OUT_FEATURES = 80  # not a multiple of any block_n: the last output tile is masked


@pytest.fixture(scope="module")
def interpreted():
    """triton_weight_only as its own module object, its kernels built for Triton's interpreter."""
    problem = triton_weight_only.interpreter_problem()
    if problem:
        pytest.skip(problem)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    name = "_interpreted_triton_weight_only"
    try:
        spec = importlib.util.spec_from_file_location(name, Path(torch_gpu.__file__).with_name("triton_weight_only.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the classes are made
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def random_weight(out_features: int, in_features: int, bits: int, group_size: int, dtype: torch.dtype, *,
                  has_perm: bool = True, has_bias: bool = True, half_exact: bool = False, seed: int = 0):
    """Asymmetric random codes and zeros; `half_exact`: fp16 scales and integer zeros (GPTQ / AWQ),
    else fp32 scales and fractional zeros (GGUF Q4_1's min)."""
    generator = torch.Generator().manual_seed(seed)
    group = in_features if group_size == -1 else group_size
    num_groups = -(-in_features // group)
    scales = torch.rand(out_features, num_groups, generator=generator) / 40 + 1e-3
    zeros = torch.rand(out_features, num_groups, generator=generator) * (2**bits - 1)
    if half_exact:
        scales, zeros = scales.half().float(), zeros.round()
    return AffineQuantizedWeight(
        q=torch.randint(0, 2**bits, (out_features, in_features), generator=generator, dtype=torch.uint8),
        scales=scales, zeros=zeros, bits=bits, group_size=group,
        input_perm=torch.randperm(in_features, generator=generator) if has_perm else None,
        bias=torch.randn(out_features, generator=generator).to(dtype) if has_bias else None)


def assert_close_to_reference(y: torch.Tensor, weight: AffineQuantizedWeight, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = ReferenceKernel().apply(ReferenceKernel().prepare(weight, x.dtype), x)
    assert y.dtype == x.dtype and y.shape == expected.shape == (*x.shape[:-1], weight.out_features)
    tolerance = FP32_TOLERANCE if x.dtype == torch.float32 else BF16_TOLERANCE
    torch.testing.assert_close(y.float(), expected.float(), rtol=0,
                               atol=tolerance * expected.float().abs().max().item())


def kernel_for(module, bits: int):
    return module.TritonInt8Kernel() if bits == 8 else module.TritonInt4Kernel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits, group_size", [(2, 32), (3, 64), (4, 32), (4, 64), (4, 128), (4, -1), (8, 32),
                                              (8, 128), (8, -1)])
@pytest.mark.parametrize("num_rows", [1, 3, 17, 64])
def test_kernel_matches_reference(interpreted, dtype, bits, group_size, num_rows):
    """Asymmetric zeros, act-order permutation and bias; decode rows (split K) to a 64-row tile."""
    weight = random_weight(OUT_FEATURES, 256, bits, group_size, dtype, seed=bits * 1000 + num_rows)
    kernel = kernel_for(interpreted, bits)
    prepared = kernel.prepare(weight, dtype)
    assert prepared is not None and prepared.scales.dtype == torch.float32  # fractional zeros need fp32
    x = torch.randn(num_rows, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert_close_to_reference(kernel.apply(prepared, x), weight, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits, group_size, in_features", [(4, -1, 200), (4, 64, 200), (8, 64, 200), (4, 32, 100)])
def test_ragged_inputs_and_groups(interpreted, bits, group_size, in_features, dtype):
    """K not a multiple of the K tile, N (76) not of 8 codes per word, a shorter last group, a
    prefill-sized tile (100 rows in 128-row bf16 / 64-row fp32 blocks, masked) and a leading batch dim."""
    weight = random_weight(76, in_features, bits, group_size, dtype, half_exact=True)
    kernel = kernel_for(interpreted, bits)
    prepared = kernel.prepare(weight, dtype)
    assert prepared.scales.dtype == prepared.zeros.dtype == torch.float16  # exact in fp16: half the bytes
    generator = torch.Generator().manual_seed(2)
    for x_shape in [(100,), (2, 3)]:
        x = torch.randn(*x_shape, in_features, generator=generator).to(dtype)
        assert_close_to_reference(kernel.apply(prepared, x), weight, x)


@pytest.mark.parametrize("split_k", [1, 3, 5])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_split_of_k_sums_to_the_same_result(interpreted, split_k, bits):
    """Splits that do not divide the K tiles evenly (7 tiles of 32 over 3 or 5 programs) lose nothing."""
    weight = random_weight(OUT_FEATURES, 224, bits, 32, torch.float32, has_perm=False, has_bias=False)
    prepared = kernel_for(interpreted, bits).prepare(weight, torch.float32)
    config = interpreted.LaunchConfig(block_m=16, block_n=32, block_k=32, split_k=split_k, num_warps=4, num_stages=2)
    x = torch.randn(5, 224, generator=torch.Generator().manual_seed(3))
    assert_close_to_reference(interpreted.affine_matmul(x, prepared, config), weight, x)


def test_int32_offsets_limit_weights_and_chunk_long_calls(interpreted, monkeypatch):
    """Past int32 offsets a weight goes to the reference; a call's rows run in chunks that stay below them."""
    monkeypatch.setattr(interpreted, "MAX_OFFSET", 80 * 64)
    kernel = interpreted.TritonInt4Kernel()
    assert kernel.prepare(random_weight(80, 256, 4, 32, torch.float32), torch.float32) is None
    launched_rows, launch_config = [], interpreted.launch_config

    def recording_launch_config(x, packed):
        launched_rows.append(x.shape[0])
        return launch_config(x, packed)

    monkeypatch.setattr(interpreted, "launch_config", recording_launch_config)
    weight = random_weight(80, 64, 4, 32, torch.float32)
    x = torch.randn(150, 64, generator=torch.Generator().manual_seed(5))
    assert_close_to_reference(kernel.apply(kernel.prepare(weight, torch.float32), x), weight, x)
    assert launched_rows == [64, 64, 22]  # 64 rows x 80 outputs = MAX_OFFSET


def test_pack_int4_layout(interpreted):
    """Row k, word n // 8 holds output n's code at bits 4 * (n % 8); a ragged N pads with zero codes."""
    q = torch.randint(0, 16, (19, 5), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    words = interpreted.pack_int4(q)
    assert words.dtype == torch.int32 and words.shape == (5, 3)
    for n in range(24):
        codes = (words[:, n // 8].to(torch.int64) >> (4 * (n % 8))) & 0xF
        assert torch.equal(codes, q[n].to(torch.int64) if n < 19 else torch.zeros(5, dtype=torch.int64))


def test_kernels_decline_what_they_cannot_take(interpreted):
    int8, int4 = interpreted.TritonInt8Kernel(), interpreted.TritonInt4Kernel()
    assert int4.prepare(random_weight(16, 64, 8, 32, torch.float32), torch.float32) is None
    assert int8.prepare(random_weight(16, 64, 4, 32, torch.float32), torch.float32) is None
    assert int8.prepare(random_weight(16, 64, 8, 32, torch.float32), torch.float64) is None


def test_configs_tile_rows_and_split_k_for_decode(interpreted):
    pick = interpreted.pick_config
    decode = pick(1, 3584, 3584, 128, element_bytes=2, num_sms=132)
    assert decode.block_m == 16 and decode.split_k > 1 and 3584 // 128 // decode.split_k >= 4
    assert pick(32, 3584, 18944, 128, 2, 132).block_m == 32
    prefill = pick(4096, 18944, 3584, 128, 2, 132)
    assert (prefill.block_m, prefill.block_n, prefill.split_k) == (128, 128, 1)
    assert pick(4096, 18944, 3584, 128, 4, 132).block_m == 64  # fp32 tiles take twice the shared memory
    assert pick(4096, 18944, 3584, 128, 2, 304, max_stages=2).num_stages == 2  # ROCm's LDS
    assert pick(1, 3584, 3584, 32, 2, 132).block_k == 32  # a GGUF group of 32: one group per K tile
    assert all(min(c.block_m, c.block_n, c.block_k) >= 16 for c in (decode, prefill))  # tl.dot's minimum


# Ahead-of-time compiles for GPUs this machine lacks: (triton target, pipeline stages the backend uses,
# shared memory per block). Triton's wheel carries ptxas and the AMD linker, so no GPU or toolkit is needed.
AOT_TARGETS = {"sm_90": (("cuda", 90, 32), 3, 227 << 10), "gfx942": (("hip", "gfx942", 64), 2, 64 << 10)}
# (activation dtype, bits, rows, group size): the configs that take the most shared memory (int4 decode,
# fp32 decode), per-channel prefill, and a group that does not divide the K tile (scales per row).
AOT_CASES = [("bf16", 4, 32, 128), ("bf16", 8, 4096, 3584), ("fp32", 8, 32, 128), ("fp16", 4, 17, 200)]


@pytest.mark.skipif(TRITON_VERSION < (3, 9), reason="the ahead-of-time compile API used here is triton 3.9's")
@pytest.mark.parametrize("target_name", list(AOT_TARGETS))
@pytest.mark.parametrize("dtype, bits, num_rows, group_size", AOT_CASES)
def test_kernel_compiles_for_h200_and_mi300_within_shared_memory(target_name, dtype, bits, num_rows, group_size,
                                                                   tmp_path, monkeypatch):
    """What the interpreter cannot show: the kernel lowers to PTX / cubin and to gfx942 code, and each
    config's shared memory fits the device (Qwen2-7B's 3584 x 3584 at this row count)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (it warns otherwise)
    target, max_stages, shared_bytes = AOT_TARGETS[target_name]
    element_bytes = 4 if dtype == "fp32" else 2
    config = triton_weight_only.pick_config(num_rows, 3584, 3584, group_size, element_bytes, 132, max_stages)
    out_type = "*fp32" if config.split_k > 1 else f"*{dtype}"
    constexprs = dict(GROUP_SIZE=group_size, BITS=bits, CODES_PER_WORD=1 if bits == 8 else 8, BLOCK_M=config.block_m,
                      BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
                      IS_GROUP_ALIGNED=group_size % config.block_k == 0, IS_DOT_FP32=dtype == "fp32",
                      IS_BF16_IN_FP32=False)
    signature = {"x_ptr": f"*{dtype}", "codes_ptr": "*u8" if bits == 8 else "*i32", "scales_ptr": "*fp16",
                 "zeros_ptr": "*fp16", "out_ptr": out_type, "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
                 "stride_om": "i32", **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=triton_weight_only._affine_matmul_kernel, signature=signature, constexprs=constexprs)
    compiled = triton_weight_only.triton.compile(source, target=GPUTarget(*target),
                                                 options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    assert 0 < compiled.metadata.shared <= shared_bytes


QUANTIZED = QuantizationConfig(method="gptq", is_prequantized=True, bits=4, group_size=128)


@pytest.mark.parametrize("plugin", [cuda_plugin, rocm_plugin], ids=["cuda", "rocm"])
def test_gpu_hooks_offer_the_triton_kernels(plugin, interpreted, monkeypatch):
    """Both kernels pass the start-up check (here on the interpreter) and are offered before the reference."""
    monkeypatch.setattr(torch_gpu, "import_triton_kernels", lambda: interpreted)
    method = plugin.tgserve_make_linear_method(quantize="gptq", dtype="bfloat16", device=torch.device("cpu"),
                                               quantization=QUANTIZED)
    assert [kernel.name for kernel in method.kernels] == ["triton-int8", "triton-int4"]
    assert method.dtype == torch.bfloat16 and method.quantization is QUANTIZED
    assert plugin.tgserve_make_linear_method(quantize=None, dtype=torch.bfloat16, device=torch.device("cpu"),
                                             quantization=None) is None  # the core's F.linear method answers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_start_up_check_passes_every_kernel(interpreted, dtype):
    usable = kernel_check.usable_kernels(interpreted.make_triton_kernels(), dtype, torch.device("cpu"))
    assert [kernel.name for kernel in usable] == ["triton-int8", "triton-int4"]


@pytest.mark.parametrize("failure, reason", [("raises", "it failed: RuntimeError('PassManager::run failed')"),
                                             ("wrong", "its answers differ from the reference's by"),
                                             ("declines", "takes neither 8-bit nor 4-bit codes")])
def test_a_kernel_that_fails_its_start_up_check_is_not_offered(interpreted, monkeypatch, caplog, failure, reason):
    """A Triton that cannot compile the kernel here, a kernel off by 5%, or a dtype it does not take: the
    reference serves instead, and one line per kernel says why."""
    matmul = interpreted.affine_matmul

    def broken(x, weight, config=None):
        if failure == "raises":
            raise RuntimeError("PassManager::run failed")
        return matmul(x, weight, config) * 1.05

    monkeypatch.setattr(interpreted, "affine_matmul", broken)
    dtype = torch.float64 if failure == "declines" else torch.float32
    with caplog.at_level(logging.WARNING, logger=kernel_check.__name__):
        assert kernel_check.usable_kernels(interpreted.make_triton_kernels(), dtype, torch.device("cpu")) == ()
    assert [record.getMessage().split(" kernel not used")[0] for record in caplog.records] == [
        "triton-int8", "triton-int4"]
    assert all(reason in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("plugin", [cuda_plugin, rocm_plugin], ids=["cuda", "rocm"])
def test_without_triton_the_reference_serves_with_one_log_line(plugin, monkeypatch, caplog):
    def no_triton():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(torch_gpu, "import_triton_kernels", no_triton)
    with caplog.at_level(logging.INFO, logger=torch_gpu.__name__):
        method = plugin.tgserve_make_linear_method(quantize="gptq", dtype=torch.bfloat16,
                                                   device=torch.device("cpu"), quantization=QUANTIZED)
    assert method.kernels == () and method.quantization is QUANTIZED
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "triton does not import" in warnings[0].getMessage()
    assert "pip install tgserve[cuda]" in warnings[0].getMessage()


def test_eetq_engine_on_the_triton_int8_kernel_matches_the_reference(interpreted, demo_model_dir, monkeypatch):
    """`--quantize eetq` through the engine with every linear on the (interpreted) Triton int8 kernel:
    the cpu backend is handed the Triton kernels in place of its own (native and aten), so a real model runs them."""
    from tgserve.backends.cpu import plugin as cpu_plugin
    from tgserve.core.layers.linear import Linear

    from ..core.engine_harness import request, run_all, running_engine

    prompts = [[1, 2, 3, 4], list(range(5, 30))]
    answers = {}
    for name, kernels in (("reference", ()), ("triton", interpreted.make_triton_kernels())):
        monkeypatch.setattr(cpu_plugin, "make_native_kernels", lambda *args: ())
        monkeypatch.setattr(cpu_plugin, "make_weight_only_kernels", lambda dtype, kernels=kernels: kernels)
        with running_engine(demo_model_dir, quantize="eetq", dtype="float32") as engine:
            linears = [m for m in engine.runner.model.modules() if isinstance(m, Linear)]
            answers[name] = run_all(engine, [request(prompt, max_new_tokens=6) for prompt in prompts])
        assert linears and {layer.prepared[0].name for layer in linears} == {"reference" if name == "reference"
                                                                             else "triton-int8"}
    for got, expected in zip(answers["triton"], answers["reference"]):
        assert got.ids == expected.ids
        assert [e.logprob for e in got.events] == pytest.approx([e.logprob for e in expected.events], abs=1e-4)
