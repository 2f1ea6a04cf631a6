"""Triton weight-only GEMMs for the GPU backends (cuda, and rocm through Triton on ROCm).

One kernel, y[M, N] = x[M, K] @ W^T with W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g], g = k // group,
run on two packings chosen once per layer in `prepare`:
  - int4 (`TritonInt4Kernel`, codes of 2, 3 or 4 bits): eight 4-bit codes per int32 along N, [K, ceil(N/8)],
    so a tile's words load once, coalesced, and are repeated 8x along N in registers before unpacking;
  - int8 (`TritonInt8Kernel`): one code per byte, uint8 [K, N] (eetq, GPTQ / compressed-tensors int8,
    GGUF Q8_0).
Codes stay packed on the device; each program dequantizes one [BLOCK_K, BLOCK_N] tile in registers
(fp32), casts it to the activations' dtype and feeds `tl.dot` with an fp32 accumulator, so the whole
weight is never dequantized. Scales and zeros are [num_groups, N], fp16 where that holds them exactly
(GPTQ / AWQ scales, integer zeros) and fp32 otherwise (GGUF Q4_1's fractional zeros). float32
activations use `input_precision="ieee"` (no TF32), so float32 runs keep the reference's accuracy.

Block sizes are fixed per row count (no autotuning, so the first step compiles each shape once and
runs the same code every time): decode rows get a 16- or 32-row tile and split K over extra programs
(fp32 atomic adds) until the GPU's multiprocessors are busy; prefill gets 128x128 tiles. Imported by
the GPU backends' hook (`torch_gpu.triton_kernels`, which offers only the kernels `kernel_check` passes)
and the gpu-check benchmark, never by the core; tests run it on CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy
import torch
import triton
import triton.language as tl

from tgserve.core.quantization.weight_only import AffineQuantizedWeight, WeightOnlyKernel

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT4_CODES_PER_WORD = 8  # 4-bit codes per int32 word
MAX_OFFSET = 2**31 - 1  # the kernel indexes with int32: a weight, and a call's x and y, stay below this
INTERPRETER_NUM_SMS = 4  # stands in for the multiprocessor count on a CPU (TRITON_INTERPRET=1)


@triton.jit
def _affine_matmul_kernel(x_ptr, codes_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                          GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          SPLIT_K: tl.constexpr, IS_GROUP_ALIGNED: tl.constexpr, IS_DOT_FP32: tl.constexpr,
                          IS_BF16_IN_FP32: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile over this program's share (axis 1) of K's tiles.

    Only builtins (no `tl.cdiv` / `tl.zeros`, which are @jit functions): the interpreter then runs it
    even where triton was imported before TRITON_INTERPRET was set."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    is_row = offs_m < M
    is_col = offs_n < N
    num_k_tiles = (K + BLOCK_K - 1) // BLOCK_K
    tiles_per_split = (num_k_tiles + SPLIT_K - 1) // SPLIT_K
    first_tile = pid_k * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, num_k_tiles)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k_tile in range(first_tile, last_tile):
        offs_k = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
        is_k = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=is_row[:, None] & is_k[None, :],
                    other=0.0)
        tile_mask = is_k[:, None] & is_col[None, :]
        if CODES_PER_WORD == 1:
            codes = tl.load(codes_ptr + offs_k[:, None] * N + offs_n[None, :], mask=tile_mask, other=0)
        else:  # [BLOCK_K, BLOCK_N / 8] words, each repeated 8 times along N in registers (CODES_PER_WORD is 8)
            num_words_n = (N + CODES_PER_WORD - 1) // CODES_PER_WORD
            offs_w = pid_n * (BLOCK_N // CODES_PER_WORD) + tl.arange(0, BLOCK_N // CODES_PER_WORD)
            words = tl.load(codes_ptr + offs_k[:, None] * num_words_n + offs_w[None, :],
                            mask=is_k[:, None] & (offs_w < num_words_n)[None, :], other=0)
            words = tl.reshape(tl.join(words, words), (BLOCK_K, BLOCK_N // 4))
            words = tl.reshape(tl.join(words, words), (BLOCK_K, BLOCK_N // 2))
            words = tl.reshape(tl.join(words, words), (BLOCK_K, BLOCK_N))
            codes = (words >> ((offs_n % CODES_PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)
        if IS_GROUP_ALIGNED:  # the whole tile lies in one group: one row of scales and zeros
            group_offs = (k_tile * BLOCK_K) // GROUP_SIZE * N + offs_n[None, :]
            group_mask = is_col[None, :]
        else:  # groups change inside the tile (or a ragged last group): a row per k
            group_offs = (offs_k // GROUP_SIZE)[:, None] * N + offs_n[None, :]
            group_mask = tile_mask
        scales = tl.load(scales_ptr + group_offs, mask=group_mask, other=0.0).to(tl.float32)
        zeros = tl.load(zeros_ptr + group_offs, mask=group_mask, other=0.0).to(tl.float32)
        w = (codes.to(tl.float32) - zeros) * scales
        if IS_BF16_IN_FP32:  # the interpreter's stand-in for a bf16 dot (see `_is_interpreted`)
            a = a.to(tl.float32)
        else:
            w = w.to(x_ptr.dtype.element_ty)
        if IS_DOT_FP32:  # float32 operands: IEEE products, not TF32
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = is_row[:, None] & is_col[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


@dataclass(slots=True, frozen=True)
class LaunchConfig:
    """Tile sizes and launch shape of one call (fixed per row count, see `pick_config`)."""

    block_m: int  # rows of x per program
    block_n: int  # outputs per program
    block_k: int  # inputs per step of the K loop
    split_k: int  # programs sharing one output tile's K range (fp32 atomic adds when > 1)
    num_warps: int
    num_stages: int


@dataclass(slots=True)
class PackedWeight:
    """What `apply` reads: one layer's weight in the kernel's packing, on the weight's device."""

    codes: torch.Tensor  # int32 [K, ceil(N / 8)] (output n at bits 4 * (n % 8) of word n // 8) or uint8 [K, N]
    scales: torch.Tensor  # fp16 or fp32 [num_groups, N]
    zeros: torch.Tensor  # same dtype as scales, [num_groups, N], in code units
    bits: int  # bits per code in `codes` (4 for the int4 packing whatever the format's bits, 8 for int8)
    codes_per_word: int  # codes per element of `codes`: 8 or 1
    group_size: int  # inputs per group (in_features for one group per output)
    in_features: int  # K
    out_features: int  # N
    input_perm: torch.Tensor | None  # int64 [K]: x[..., input_perm] feeds the kernel (act-order), or None
    bias: torch.Tensor | None  # [N] in the run dtype, added after the kernel


def pick_config(num_rows: int, out_features: int, in_features: int, group_size: int, element_bytes: int,
                num_sms: int, max_stages: int = 3) -> LaunchConfig:
    """Fixed tiles by row count. Decode (<= 32 rows) is a read of the weight: 16- or 32-row tiles, and K
    split until ~2 programs per multiprocessor (keeping >= 4 K tiles per split). Larger batches and
    prefill tile M like a dense GEMM. Every block is >= 16 (`tl.dot`'s minimum). float32 activations
    halve the decode K tile and the prefill rows. Compiled ahead of time (triton 3.9), every config
    takes <= 90 KiB of shared memory on sm_90 (3 stages; H100 / H200 have 227 KiB) and <= 48 KiB on
    gfx942 (`max_stages` 2; MI300's LDS is 64 KiB): tests/backends/test_triton_weight_only.py."""
    if num_rows <= 32:
        block_m, block_n, block_k = (16 if num_rows <= 16 else 32), 128, (128 if element_bytes <= 2 else 64)
        num_warps = 4
    elif num_rows <= 64:
        block_m, block_n, block_k, num_warps = 64, 128, 64, 4
    else:
        block_m, block_n, block_k, num_warps = (128, 128, 64, 8) if element_bytes <= 2 else (64, 128, 32, 8)
    if group_size < block_k and group_size % 16 == 0:  # keep each K tile inside one group (GGUF's 32)
        block_k = group_size
    split_k = 1
    if num_rows <= 32:
        num_tiles = triton.cdiv(num_rows, block_m) * triton.cdiv(out_features, block_n)
        num_k_tiles = triton.cdiv(in_features, block_k)
        split_k = max(1, min(triton.cdiv(2 * num_sms, num_tiles), num_k_tiles // 4, 16))
    return LaunchConfig(block_m, block_n, block_k, split_k, num_warps, min(3, max_stages))


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors (compute units on ROCm) of `device`; a stand-in on the CPU interpreter."""
    if device.type != "cuda":
        return INTERPRETER_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _max_stages() -> int:
    """Software-pipeline depth: 2 on ROCm (its stream pipeliner's default; 64 KiB of LDS), else 3."""
    return 2 if torch.version.hip else 3


def launch_config(x: torch.Tensor, weight: PackedWeight) -> LaunchConfig:
    """The config `affine_matmul` runs x [M, K] @ `weight` with on x's device."""
    return pick_config(x.shape[0], weight.out_features, weight.in_features, weight.group_size, x.element_size(),
                       _num_sms(x.device), _max_stages())


def affine_matmul(x: torch.Tensor, weight: PackedWeight, config: LaunchConfig | None = None) -> torch.Tensor:
    """x [M, K] (contiguous rows, already permuted) @ W^T -> [M, N] in x's dtype, no bias."""
    num_rows = x.shape[0]
    if num_rows == 0:
        return x.new_empty(0, weight.out_features)
    max_rows = MAX_OFFSET // max(weight.in_features, weight.out_features)
    if num_rows > max_rows:  # a prefill too long for int32 offsets: in row chunks
        return torch.cat([affine_matmul(x[start:start + max_rows], weight, config)
                          for start in range(0, num_rows, max_rows)])
    config = config or launch_config(x, weight)
    is_bf16_in_fp32 = _is_interpreted(x) and x.dtype == torch.bfloat16
    if config.split_k == 1 and not is_bf16_in_fp32:
        out = torch.empty(num_rows, weight.out_features, dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros(num_rows, weight.out_features, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(num_rows, config.block_m) * triton.cdiv(weight.out_features, config.block_n), config.split_k)
    _affine_matmul_kernel[grid](
        x, weight.codes, weight.scales, weight.zeros, out, num_rows, weight.out_features, weight.in_features,
        x.stride(0), out.stride(0), GROUP_SIZE=weight.group_size, BITS=weight.bits,
        CODES_PER_WORD=weight.codes_per_word, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, SPLIT_K=config.split_k, IS_GROUP_ALIGNED=weight.group_size % config.block_k == 0,
        IS_DOT_FP32=x.dtype == torch.float32 or is_bf16_in_fp32, IS_BF16_IN_FP32=is_bf16_in_fp32,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _is_interpreted(x: torch.Tensor) -> bool:
    """CPU tensors reach a Triton kernel only under TRITON_INTERPRET=1. Its `tl.dot` (numpy matmul)
    multiplies bf16 operands as their uint16 bit patterns, and its fp32 -> bf16 casts truncate where GPUs
    round to nearest even (triton 3.9). So there a bf16 run keeps the dequantized tile in fp32 and writes
    fp32 output that torch rounds: the tile's rounding to bf16 is the one GPU step CPU tests do not replay."""
    return x.device.type == "cpu"


def interpreter_problem() -> str | None:
    """Why this triton's CPU interpreter cannot run the kernel here, or None. Before 3.9 it turns a run-time
    loop bound into an int with int() of a 1-element array, an error from numpy 2.4 on (3.6 seen failing,
    3.9 passing)."""
    triton_version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    numpy_version = tuple(int(part) for part in numpy.__version__.split(".")[:2])
    if triton_version < (3, 9) and numpy_version >= (2, 4):
        return (f"triton {triton.__version__}'s CPU interpreter cannot take a run-time loop bound under numpy "
                f"{numpy.__version__}: running the kernels on a CPU (TRITON_INTERPRET=1) needs triton >= 3.9 or "
                f"numpy < 2.4")
    return None


def _group_tensors(weight: AffineQuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """scales and zeros transposed to [num_groups, N]: fp16 when both round-trip exactly, else fp32."""
    scales, zeros = weight.scales.float().t().contiguous(), weight.zeros.float().t().contiguous()
    halves = scales.half(), zeros.half()
    if all(torch.equal(half.float(), full) for half, full in zip(halves, (scales, zeros))):
        return halves
    return scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (< 16) -> int32 [K, ceil(N / 8)]: output n's code in word n // 8 at bits 4 * (n % 8)."""
    out_features, in_features = q.shape
    padded = torch.nn.functional.pad(q.t(), (0, -out_features % INT4_CODES_PER_WORD))  # uint8 [K, N rounded up]
    words = torch.zeros(in_features, padded.shape[1] // INT4_CODES_PER_WORD, dtype=torch.int64, device=q.device)
    for position in range(INT4_CODES_PER_WORD):  # one position at a time: no [K, N] int64 copy at load
        words |= padded[:, position::INT4_CODES_PER_WORD].to(torch.int64) << (4 * position)
    words = torch.where(words >= 2**31, words - 2**32, words)  # < 2**32: the same 32 bits as a signed int32
    return words.to(torch.int32).contiguous()


class TritonWeightOnlyKernel(WeightOnlyKernel):
    """Shared prepare / apply; subclasses say which bits they take and how codes are packed."""

    max_bits = 0
    min_bits = 0

    def pack(self, q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """uint8 codes [N, K] -> (packed codes, bits per code, codes per element)."""
        raise NotImplementedError

    def prepare(self, weight: AffineQuantizedWeight, dtype: torch.dtype) -> object | None:
        if (not self.min_bits <= weight.bits <= self.max_bits or dtype not in DTYPES
                or weight.in_features * weight.out_features > MAX_OFFSET):
            return None
        codes, bits, codes_per_word = self.pack(weight.q)
        scales, zeros = _group_tensors(weight)
        return PackedWeight(codes, scales, zeros, bits, codes_per_word, weight.group_size, weight.in_features,
                            weight.out_features, weight.input_perm, weight.bias)

    def apply(self, prepared: object, x: torch.Tensor) -> torch.Tensor:
        weight: PackedWeight = prepared
        rows = x.reshape(-1, x.shape[-1])
        if weight.input_perm is not None:
            rows = rows.index_select(-1, weight.input_perm)
        y = affine_matmul(rows.contiguous(), weight)
        if weight.bias is not None:
            y = y + weight.bias
        return y.reshape(*x.shape[:-1], weight.out_features)


class TritonInt4Kernel(TritonWeightOnlyKernel):
    """Codes of 2, 3 or 4 bits (GPTQ, AWQ, compressed-tensors int4, GGUF Q4_0 / Q4_1), any group size."""

    name = "triton-int4"
    min_bits, max_bits = 1, 4

    def pack(self, q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        return pack_int4(q), 4, INT4_CODES_PER_WORD


class TritonInt8Kernel(TritonWeightOnlyKernel):
    """8-bit codes, per group or per output channel (eetq, GPTQ / compressed-tensors int8, GGUF Q8_0)."""

    name = "triton-int8"
    min_bits, max_bits = 8, 8

    def pack(self, q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        return q.t().contiguous(), 8, 1


def make_triton_kernels() -> tuple[WeightOnlyKernel, ...]:
    """Every Triton kernel, in the order a GPU backend asks them before the reference (those that pass
    `kernel_check.usable_kernels` on the device)."""
    return TritonInt8Kernel(), TritonInt4Kernel()
