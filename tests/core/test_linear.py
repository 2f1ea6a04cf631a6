"""Linear layers own nothing of the weight format: a test method with its own packed int4 parameters
loads a checkpoint by parameter name, and column- and row-parallel splits of it (and of the dense
reference method) reproduce the unsplit layer.

Oracle: `F.linear` in float64 on the weight the test's own quantizer dequantized before packing
(`quantize_int4`), never the method's unpacking.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgserve.core.layers.linear import Linear, LinearLoadError, LinearMethod, LinearParam, Parallel

GROUP_SIZE = 8  # input features sharing one scale
IN_FEATURES = 32
QKV_SIZES = [16, 8, 8]  # fused q, k, v parts
WORLD_SIZE = 2


class PackedInt4Method(LinearMethod):
    """Test method: int4 weights, two per byte along the output features, one scale per output and group.

    weight_packed: uint8 [out / 2, in]; output 2i in the low nibble, 2i + 1 in the high one, each
    stored as value + 8. scales: [out, in / GROUP_SIZE]. Weights stay packed; `apply` unpacks.
    """

    name = "test-int4"

    def create_params(self, in_features, output_sizes, has_bias, dtype, device):
        out_features = sum(output_sizes)
        params = {
            "weight_packed": LinearParam(torch.zeros(out_features // 2, in_features, dtype=torch.uint8, device=device),
                                         output_dim=0, input_dim=1, output_pack=2),
            "scales": LinearParam(torch.zeros(out_features, in_features // GROUP_SIZE, dtype=dtype, device=device),
                                  output_dim=0, input_dim=1, input_pack=GROUP_SIZE),
        }
        if has_bias:
            params["bias"] = LinearParam(torch.zeros(out_features, dtype=dtype, device=device), output_dim=0)
        return params

    def prepare(self, params):
        return params["weight_packed"], params["scales"], params.get("bias")

    def apply(self, prepared, x):
        packed, scales, bias = prepared
        low, high = (packed & 0xF).to(x.dtype) - 8, (packed >> 4).to(x.dtype) - 8
        values = torch.stack([low, high], dim=1).flatten(0, 1)  # [out, in]: rows 2i, 2i + 1
        weight = values * scales.repeat_interleave(GROUP_SIZE, dim=1)
        return F.linear(x, weight, bias)


def quantize_int4(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Checkpoint tensors of `weight` [out, in] in PackedInt4Method's format, and the dequantized weight."""
    grouped = weight.unflatten(1, (-1, GROUP_SIZE))  # [out, groups, GROUP_SIZE]
    scales = grouped.abs().amax(dim=2) / 7
    values = torch.round(grouped / scales[..., None]).clamp(-8, 7)
    dequantized = (values * scales[..., None]).flatten(1)
    stored = (values.flatten(1) + 8).to(torch.uint8)
    packed = stored[0::2] | (stored[1::2] << 4)
    return {"weight_packed": packed, "scales": scales}, dequantized


def checkpoint(method: LinearMethod, output_sizes: list[int], has_bias: bool, seed: int):
    """Per fused part, the checkpoint tensors by name; and the whole layer's reference weight and bias."""
    generator = torch.Generator().manual_seed(seed)
    parts, weights, biases = [], [], []
    for size in output_sizes:
        weight = torch.randn(size, IN_FEATURES, generator=generator)
        tensors, reference = quantize_int4(weight) if isinstance(method, PackedInt4Method) else ({"weight": weight},
                                                                                                  weight)
        if has_bias:
            tensors["bias"] = torch.randn(size, generator=generator)
            biases.append(tensors["bias"])
        parts.append(tensors)
        weights.append(reference)
    return parts, torch.cat(weights), torch.cat(biases) if has_bias else None


def build(method, output_sizes, has_bias, parts, parallel=Parallel.REPLICATED, rank=0, world_size=1,
          part_shards=None) -> Linear:
    layer = Linear(IN_FEATURES, output_sizes, has_bias, method, torch.float32, torch.device("cpu"),
                   parallel, rank, world_size, part_shards=part_shards)
    for index, tensors in enumerate(parts):
        for name, tensor in tensors.items():
            layer.load(index, name, tensor)
    layer.finalize()
    return layer


METHODS = [pytest.param(PackedInt4Method(), id="packed-int4"), pytest.param(LinearMethod(), id="dense")]


@pytest.fixture
def x():
    return torch.randn(5, IN_FEATURES, generator=torch.Generator().manual_seed(7))


def test_packed_method_loads_fused_checkpoint_by_name_and_matches_f_linear(x):
    method = PackedInt4Method()
    parts, weight, bias = checkpoint(method, QKV_SIZES, True, seed=1)
    layer = build(method, QKV_SIZES, True, parts)
    assert layer.params is None  # only the prepared form stays
    expected = F.linear(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_row_parallel_partial_outputs_sum_to_the_whole_layer(method, x):
    parts, _, _ = checkpoint(method, [24], True, seed=2)
    whole = build(method, [24], True, parts)(x)
    width = IN_FEATURES // WORLD_SIZE
    partials = [build(method, [24], True, parts, Parallel.ROW, rank, WORLD_SIZE)(x[:, rank * width:(rank + 1) * width])
                for rank in range(WORLD_SIZE)]
    torch.testing.assert_close(sum(partials), whole, rtol=1e-5, atol=1e-4)  # the bias counted once


@pytest.mark.parametrize("method", METHODS)
def test_column_parallel_ranks_hold_their_slice_of_every_fused_part(method, x):
    parts, _, _ = checkpoint(method, QKV_SIZES, True, seed=3)
    q, k, v = build(method, QKV_SIZES, True, parts)(x).split(QKV_SIZES, dim=-1)
    for rank in range(WORLD_SIZE):
        got = build(method, QKV_SIZES, True, parts, Parallel.COLUMN, rank, WORLD_SIZE)(x)
        expected = torch.cat([part.chunk(WORLD_SIZE, dim=-1)[rank] for part in (q, k, v)], dim=-1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_parts_cut_into_fewer_slices_than_ranks_are_shared_by_consecutive_ranks(method, x):
    """KV-head replication (issue 14): at 4 ranks q is cut in 4, k and v in 2, rank r holding slice r * 2 // 4."""
    parts, _, _ = checkpoint(method, QKV_SIZES, True, seed=4)
    q, k, v = build(method, QKV_SIZES, True, parts)(x).split(QKV_SIZES, dim=-1)
    for rank in range(4):
        got = build(method, QKV_SIZES, True, parts, Parallel.COLUMN, rank, 4, part_shards=[4, 2, 2])(x)
        expected = torch.cat([q.chunk(4, dim=-1)[rank], k.chunk(2, dim=-1)[rank // 2], v.chunk(2, dim=-1)[rank // 2]],
                             dim=-1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("part_shards, parallel, match", [
    ([4, 3, 3], Parallel.COLUMN, "do not divide 4 ranks"),
    ([4, 2], Parallel.COLUMN, "3 parts"),
    ([1, 1, 1], Parallel.ROW, "column-parallel"),
])
def test_slices_per_part_that_cannot_spread_evenly_over_the_ranks_are_refused(part_shards, parallel, match):
    with pytest.raises(LinearLoadError, match=match):
        Linear(IN_FEATURES, QKV_SIZES, False, LinearMethod(), torch.float32, torch.device("cpu"), parallel, 0, 4,
               part_shards=part_shards)


def test_checkpoint_tensors_the_method_does_not_have_or_that_do_not_fit_are_refused():
    layer = Linear(IN_FEATURES, [16], False, PackedInt4Method(), torch.float32, torch.device("cpu"))
    with pytest.raises(LinearLoadError, match="has weight but"):
        layer.load(0, "weight", torch.zeros(16, IN_FEATURES))
    with pytest.raises(LinearLoadError, match="does not fit"):
        layer.load(0, "scales", torch.zeros(16, 1))  # would broadcast into [16, 4]
    with pytest.raises(LinearLoadError, match="does not split"):
        Linear(IN_FEATURES, [12, 6], False, PackedInt4Method(), torch.float32, torch.device("cpu"),
               Parallel.COLUMN, 0, 4)
    with pytest.raises(LinearLoadError, match="not multiples of 2"):  # 3 outputs per rank tear a packed byte
        Linear(IN_FEATURES, [6], False, PackedInt4Method(), torch.float32, torch.device("cpu"),
               Parallel.COLUMN, 0, 2)
