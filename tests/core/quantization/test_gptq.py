"""GPTQ's loader against checkpoints written by the test's own packer (gptq_writer.py, from the published
layout): every bits x group size x sym x act-order, v1 and v2 zero points, fused parts, float layers,
and the errors that name a tensor. Oracle: `F.linear` in float64 on the writer's dequantized weight."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgserve.core.layers.linear import Linear, LinearLoadError, LinearMethod, Parallel
from tgserve.core.quantization.gptq import GptqLinearMethod
from tgserve.core.quantization.quant_config import QuantizationError, resolve_quantization

from .gptq_writer import gptq_quantize, pack_stream, quantization_config

IN_FEATURES, OUT_FEATURES = 256, 64
CPU = torch.device("cpu")


def gptq_method(section: dict, dtype: torch.dtype = torch.float32) -> GptqLinearMethod:
    quantization = resolve_quantization(None, {"quantization_config": section})
    return GptqLinearMethod(quantization, dtype, dense=LinearMethod())


def load_layer(method, parts: list[dict[str, torch.Tensor]], in_features: int, output_sizes: list[int],
               prefixes: tuple[str, ...], parallel=Parallel.REPLICATED, bias: list[torch.Tensor] | None = None):
    layer = Linear(in_features, output_sizes, bias is not None, method, torch.float32, CPU, parallel,
                   prefixes=prefixes)
    for part, tensors in enumerate(parts):
        for name, tensor in tensors.items():
            layer.load(part, name, tensor)
        if bias is not None:
            layer.load(part, "bias", bias[part])
    layer.finalize()
    return layer


def x_for(in_features: int) -> torch.Tensor:
    return torch.randn(6, in_features, generator=torch.Generator().manual_seed(11))


def test_the_writer_packs_3_bit_runs_across_words_as_autogptq_does():
    # AutoGPTQ's 3-bit pack: values 0-9 in word 0 bits 0-29, value 10 split (bits 30-31 | word 1 bit 0), ...
    values = list(range(8)) * 4
    words = [w & 0xFFFFFFFF for w in pack_stream(values, 3)]
    assert len(words) == 3
    assert [(words[0] >> (3 * k)) & 7 for k in range(10)] == values[:10]
    assert ((words[0] >> 30) | ((words[1] & 1) << 2)) == values[10]
    assert [(words[1] >> (3 * k + 1)) & 7 for k in range(10)] == values[11:21]
    assert ((words[1] >> 31) | ((words[2] & 3) << 1)) == values[21]
    assert [(words[2] >> (3 * k + 2)) & 7 for k in range(10)] == values[22:]


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layer_output_is_the_independently_dequantized_matmul(bits, group_size, sym, act_order):
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=torch.Generator().manual_seed(bits * 1000 + group_size))
    tensors = gptq_quantize(weight, bits, group_size, sym, act_order, version=1, seed=bits)
    method = gptq_method(quantization_config(bits, group_size, sym, act_order))
    layer = load_layer(method, [tensors.as_checkpoint()], IN_FEATURES, [OUT_FEATURES], ("model.layers.0.mlp.up_proj",))
    x = x_for(IN_FEATURES)
    torch.testing.assert_close(layer(x).double(), F.linear(x.double(), tensors.dequantized), rtol=1e-5, atol=1e-4)
    _, (affine, _) = layer.prepared  # the reference kernel keeps codes, one byte each, not a float copy
    assert affine.q.dtype == torch.uint8 and affine.bits == bits
    assert (affine.input_perm is not None) == (act_order and group_size != -1)  # one group needs no order


@pytest.mark.parametrize("version, checkpoint_format", [(1, None), (1, "gptq"), (2, "gptq_v2")])
def test_zero_points_v1_store_zero_minus_one_and_v2_the_zero(version, checkpoint_format):
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=torch.Generator().manual_seed(5))
    tensors = gptq_quantize(weight, 4, 32, sym=False, act_order=False, version=version)
    x = x_for(IN_FEATURES)
    for fmt, expect_match in ((checkpoint_format, True), ("gptq_v2" if version == 1 else "gptq", False)):
        method = gptq_method(quantization_config(4, 32, sym=False, checkpoint_format=fmt))
        got = load_layer(method, [tensors.as_checkpoint()], IN_FEATURES, [OUT_FEATURES], ("m",))(x).double()
        assert torch.allclose(got, F.linear(x.double(), tensors.dequantized), rtol=1e-5, atol=1e-4) == expect_match


def test_a_missing_g_idx_means_inputs_in_group_order_and_a_last_group_may_be_partial():
    in_features = 352  # the demo model's intermediate size: groups of 128 leave a last group of 96
    weight = torch.randn(OUT_FEATURES, in_features, generator=torch.Generator().manual_seed(6))
    tensors = gptq_quantize(weight, 4, 128, sym=True, act_order=False)
    assert tensors.scales.shape == (3, OUT_FEATURES)
    method = gptq_method(quantization_config(4, 128))
    layer = load_layer(method, [tensors.as_checkpoint(with_g_idx=False)], in_features, [OUT_FEATURES],
                       ("model.layers.0.mlp.down_proj",), Parallel.ROW)
    x = x_for(in_features)
    torch.testing.assert_close(layer(x).double(), F.linear(x.double(), tensors.dequantized), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
def test_fused_qkv_with_bias_and_act_order_matches_the_concatenated_parts(bits):
    sizes, generator = [64, 32, 32], torch.Generator().manual_seed(7)
    parts = [gptq_quantize(torch.randn(size, IN_FEATURES, generator=generator), bits, 32, sym=False,
                           act_order=True, seed=3) for size in sizes]  # one seed: q, k, v share one input order
    biases = [torch.randn(size, generator=generator) for size in sizes]
    prefixes = tuple(f"model.layers.0.self_attn.{name}_proj" for name in "qkv")
    layer = load_layer(gptq_method(quantization_config(bits, 32, sym=False, desc_act=True)),
                       [part.as_checkpoint() for part in parts], IN_FEATURES, sizes, prefixes, Parallel.COLUMN, biases)
    x = x_for(IN_FEATURES)
    expected = F.linear(x.double(), torch.cat([part.dequantized for part in parts]), torch.cat(biases).double())
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-4)


def test_fused_parts_with_different_input_orders_are_an_error_naming_the_tensor():
    generator = torch.Generator().manual_seed(8)
    parts = [gptq_quantize(torch.randn(32, IN_FEATURES, generator=generator), 4, 32, sym=True, act_order=True,
                           seed=seed) for seed in (1, 2)]
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.mlp\.up_proj\.g_idx differs from "
                                                r"model\.layers\.0\.mlp\.gate_proj\.g_idx"):
        load_layer(gptq_method(quantization_config(4, 32, desc_act=True)), [part.as_checkpoint() for part in parts],
                   IN_FEATURES, [32, 32], ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"))


@pytest.mark.parametrize("written_bits, config_bits, config_group, bad", [
    (2, 4, 32, "qweight"), (2, 8, 32, "qweight"), (2, 3, 32, "qweight"), (4, 4, 128, "qzeros")])
def test_a_tensor_contradicting_bits_or_group_size_is_an_error_naming_it(written_bits, config_bits, config_group,
                                                                         bad):
    tensors = gptq_quantize(torch.randn(OUT_FEATURES, IN_FEATURES), written_bits, 32, True, False)
    method = gptq_method(quantization_config(config_bits, config_group))
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(LinearLoadError, match=rf"checkpoint tensor {name}\.{bad} has shape .* but gptq "
                                              rf"{config_bits}-bit, group size {config_group} expects"):
        load_layer(method, [tensors.as_checkpoint()], IN_FEATURES, [OUT_FEATURES], (name,))


def test_float_scales_where_codes_belong_are_refused():
    tensors = gptq_quantize(torch.randn(OUT_FEATURES, IN_FEATURES), 4, 32, True, False)
    layer = Linear(IN_FEATURES, [OUT_FEATURES], False, gptq_method(quantization_config(4, 32)), torch.float32, CPU,
                   prefixes=("m",))
    with pytest.raises(LinearLoadError, match=r"checkpoint tensor m\.qweight is torch.float32"):
        layer.load(0, "qweight", tensors.qweight.float())


def test_act_order_without_g_idx_is_an_error():
    tensors = gptq_quantize(torch.randn(OUT_FEATURES, IN_FEATURES), 4, 32, True, True)
    with pytest.raises(QuantizationError, match=r"m\.g_idx is missing but desc_act"):
        load_layer(gptq_method(quantization_config(4, 32, desc_act=True)), [tensors.as_checkpoint(with_g_idx=False)],
                   IN_FEATURES, [OUT_FEATURES], ("m",))


@pytest.mark.parametrize("section, problem", [
    (quantization_config(5, 32), "bits 5"),
    (quantization_config(4, 0), "group_size 0"),
    (quantization_config(4, 32, checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
])
def test_configs_tgserve_cannot_load_are_refused(section, problem):
    with pytest.raises(QuantizationError, match=problem):
        gptq_method(section)


def test_which_layers_stay_float_lm_head_modules_to_not_convert_and_dynamic():
    dense = LinearMethod()
    dynamic = {"-:model\\.layers\\.1\\..*": {}, "+:.*down_proj": {"bits": 8, "group_size": 64}}
    section = quantization_config(4, 32, modules_to_not_convert=["o_proj"], dynamic=dynamic)
    method = GptqLinearMethod(resolve_quantization("gptq", {"quantization_config": section}), torch.float32, dense)
    assert method.method_for(("lm_head",)) is dense
    assert method.method_for(("model.layers.0.self_attn.o_proj",)) is dense
    assert method.method_for(("model.layers.1.mlp.up_proj",)) is dense
    quantized = method.method_for(("model.layers.0.mlp.up_proj",))
    assert quantized.describe() == "gptq 4-bit, group size 32"
    assert method.method_for(("model.layers.0.mlp.down_proj",)).describe() == "gptq 8-bit, group size 64"
    with_head = gptq_method(quantization_config(4, 32, lm_head=True))
    assert with_head.method_for(("lm_head",)).describe() == "gptq 4-bit, group size 32, lm_head quantized"
    with pytest.raises(QuantizationError, match="not quantized alike"):
        method.method_for(("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"))


def test_a_dynamic_override_loads_with_its_own_bits():
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=torch.Generator().manual_seed(9))
    tensors = gptq_quantize(weight, 8, 64, sym=False, act_order=False)
    section = quantization_config(4, 32, sym=False, dynamic={r".*down_proj": {"bits": 8, "group_size": 64}})
    layer = load_layer(gptq_method(section), [tensors.as_checkpoint()], IN_FEATURES, [OUT_FEATURES],
                       ("model.layers.3.mlp.down_proj",))
    x = x_for(IN_FEATURES)
    torch.testing.assert_close(layer(x).double(), F.linear(x.double(), tensors.dequantized), rtol=1e-5, atol=1e-4)


def test_gptq_on_a_float_checkpoint_is_tgis_load_error():
    with pytest.raises(QuantizationError, match="Cannot load `gptq` weight, make sure the model is already quantized"):
        resolve_quantization("gptq", {"model_type": "qwen2"})


def test_a_g_idx_whose_groups_are_not_group_size_inputs_is_an_error_naming_it():
    tensors = gptq_quantize(torch.randn(OUT_FEATURES, IN_FEATURES), 4, 32, True, True)
    g_idx = tensors.g_idx.clone()
    g_idx[g_idx == 1] = 0  # group 0 now holds 64 inputs and group 1 none
    checkpoint = {**tensors.as_checkpoint(), "g_idx": g_idx}
    with pytest.raises(QuantizationError, match=r"m\.g_idx does not put 32 inputs in each group"):
        load_layer(gptq_method(quantization_config(4, 32, desc_act=True)), [checkpoint], IN_FEATURES,
                   [OUT_FEATURES], ("m",))


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("bits, act_order", [(4, False), (8, False), (4, True), (8, True)])
def test_row_parallel_ranks_with_g_idx_sum_to_the_whole_layer(bits, act_order, world_size):
    """A rank's slice of g_idx holds global group numbers, the rows of the whole scales and zeros every
    rank holds. Without act-order they are its own groups (rank 1 of 4: groups 2, 3), whose rows it keeps.
    Under act-order every group's inputs are scattered over the whole layer, so each rank holds a part of
    every group and each input reads its own row. The ranks' partial outputs must sum to the whole layer."""
    tensors = gptq_quantize(torch.randn(OUT_FEATURES, IN_FEATURES, generator=torch.Generator().manual_seed(5)),
                            bits, 32, False, act_order, seed=3)
    x = x_for(IN_FEATURES)
    width = IN_FEATURES // world_size
    partials = []
    for rank in range(world_size):
        layer = Linear(IN_FEATURES, [OUT_FEATURES], False,
                       gptq_method(quantization_config(bits, 32, sym=False, desc_act=act_order)),
                       torch.float32, CPU, Parallel.ROW, rank, world_size, prefixes=("m",))
        for name, tensor in tensors.as_checkpoint().items():
            layer.load(0, name, tensor)
        layer.finalize()
        partials.append(layer(x[:, rank * width:(rank + 1) * width]).double())
    expected = F.linear(x.double(), tensors.dequantized)
    torch.testing.assert_close(sum(partials), expected, rtol=1e-5, atol=1e-4)


def test_an_act_order_slice_holding_whole_groups_stays_quantized():
    """Act-order whose slices happen to hold whole groups (rank 1 of 2 holds groups 0..3, rank 0 groups
    4..7): each rank takes those groups' scale rows and keeps its grouped kernel; only a slice holding
    parts of groups is dequantized."""
    tensors = gptq_quantize(torch.randn(OUT_FEATURES, IN_FEATURES, generator=torch.Generator().manual_seed(6)),
                            4, 32, False, False)
    half = IN_FEATURES // 2
    swap = torch.cat([torch.arange(half, IN_FEATURES), torch.arange(half)])  # new input i is old input swap[i]
    dequantized = tensors.dequantized[:, swap]
    words = torch.cat([tensors.qweight[half // 8:], tensors.qweight[:half // 8]])  # 8 int4 codes per word
    checkpoint = {"qweight": words, "qzeros": tensors.qzeros, "scales": tensors.scales, "g_idx": tensors.g_idx[swap]}
    x = x_for(IN_FEATURES)
    partials, kernels = [], []
    for rank in range(2):
        layer = Linear(IN_FEATURES, [OUT_FEATURES], False,
                       gptq_method(quantization_config(4, 32, sym=False, desc_act=True)),
                       torch.float32, CPU, Parallel.ROW, rank, 2, prefixes=("m",))
        for name, tensor in checkpoint.items():
            layer.load(0, name, tensor)
        layer.finalize()
        kernels.append(layer.prepared[0].name)
        partials.append(layer(x[:, rank * half:(rank + 1) * half]).double())
    assert kernels == ["reference", "reference"]
    torch.testing.assert_close(sum(partials), F.linear(x.double(), dequantized), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 4, 8])  # 3-bit runs of 32 codes do not split 176 inputs
@pytest.mark.parametrize("with_g_idx", [True, False])
def test_row_parallel_ranks_whose_split_cuts_a_group_sum_to_the_whole_layer(bits, with_g_idx):
    """The demo's down_proj in groups of 32 at 2 ranks: 176 inputs each, so rank 1 starts half-way into
    group 5. Both ranks hold every group's scales and zeros; rank 0's groups end on a short one and keep
    a grouped kernel, rank 1's do not and it is dequantized at load, which the start-up line names.
    Without g_idx a rank finds its groups from where its inputs sit in the layer."""
    in_features = 352
    tensors = gptq_quantize(torch.randn(OUT_FEATURES, in_features, generator=torch.Generator().manual_seed(bits)),
                            bits, 32, False, False)
    method = gptq_method(quantization_config(bits, 32, sym=False))
    x, half, partials, kernels = x_for(in_features), in_features // 2, [], []
    for rank in range(2):
        layer = Linear(in_features, [OUT_FEATURES], False, method, torch.float32, CPU, Parallel.ROW, rank, 2,
                       prefixes=(f"model.layers.{rank}.mlp.down_proj",))
        for name, tensor in tensors.as_checkpoint(with_g_idx=with_g_idx).items():
            layer.load(0, name, tensor)
        layer.finalize()
        kernels.append(layer.prepared[0].name)
        partials.append(layer(x[:, rank * half:(rank + 1) * half]).double())
    torch.testing.assert_close(sum(partials), F.linear(x.double(), tensors.dequantized), rtol=1e-5, atol=1e-4)
    assert kernels == ["reference", "dequantized"]
    assert method.dequantized == [("model.layers.1.mlp.down_proj", OUT_FEATURES * half * 4)]
    assert method.describe_loaded().startswith("1 quantized layer dequantized to float32 at load, 0.0 MiB: "
                                               "model.layers.*.mlp.down_proj x1 (")
