"""compressed-tensors loading: pack-quantized (4/8-bit, group and channel, symmetric and not) and
int-quantized int8 tensors, written by the test's own writer (tests/core/quantization/
compressed_tensors_writer.py) and checked against the `compressed-tensors` package itself where it is
installed (its compressor packs the same bytes, its decompressor is the oracle), load into a Linear whose
output equals F.linear on the dequantized weight; `ignore` keeps layers float; bad configs and tensors
fail by name."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgserve.core.layers.linear import Linear, LinearLoadError, LinearMethod, Parallel
from tgserve.core.quantization.compressed_tensors import CompressedTensorsLinearMethod
from tgserve.core.quantization.quant_config import QuantizationError, resolve_quantization

from .compressed_tensors_writer import ct_quantize, quantization_config

LAYOUTS = [(4, "group", 32), (4, "group", 64), (4, "group", 128), (4, "channel", None), (8, "group", 32),
           (8, "channel", None)]


def ct_method(config: dict, key: str = "quantization_config") -> CompressedTensorsLinearMethod:
    quantization = resolve_quantization(None, {key: config})
    return CompressedTensorsLinearMethod(quantization, torch.float32, dense=LinearMethod())


def loaded_layer(method, written: list, output_sizes: list[int], in_features: int, bias=None) -> Linear:
    layer = Linear(in_features, output_sizes, bias is not None, method, torch.float32, torch.device("cpu"),
                   prefixes=tuple(f"model.layers.0.mlp.part{i}" for i in range(len(output_sizes))))
    for part, tensors in enumerate(written):
        for name, tensor in tensors.tensors.items():
            layer.load(part, name, tensor)
        if bias is not None:
            layer.load(part, "bias", bias.split(output_sizes)[part])
    layer.finalize()
    return layer


@pytest.mark.parametrize("bits, strategy, group_size", LAYOUTS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_quantized_fused_layer_computes_the_dequantized_weight(bits, strategy, group_size, symmetric):
    torch.manual_seed(bits + (group_size or 0) + symmetric)
    in_features, output_sizes = 256, [64, 32, 32]
    parts = [torch.randn(size, in_features) for size in output_sizes]
    written = [ct_quantize(part, bits, strategy, group_size, symmetric) for part in parts]
    bias = torch.randn(sum(output_sizes))
    method = ct_method(quantization_config(bits, strategy, group_size, symmetric))
    layer = loaded_layer(method, written, output_sizes, in_features, bias)
    x = torch.randn(5, in_features)
    expected = F.linear(x, torch.cat([tensors.dequantized for tensors in written]), bias)
    assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(layer(x), F.linear(x, torch.cat(parts), bias), atol=1e-3)  # it is quantized


@pytest.mark.parametrize("bits, strategy, group_size", LAYOUTS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_compressed_tensors_package_agrees_with_the_writer_and_the_loader(bits, strategy, group_size, symmetric):
    pytest.importorskip("compressed_tensors", reason="needs the compressed-tensors package (pip install "
                                                     "compressed-tensors) as the oracle")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    weight = torch.randn(48, 256)
    written = ct_quantize(weight, bits, strategy, group_size, symmetric)
    scale = written.tensors["weight_scale"].float()
    decompressed = PackedQuantizationCompressor.decompress({**written.tensors, "weight_scale": scale}, scheme)["weight"]
    layer = loaded_layer(ct_method(quantization_config(bits, strategy, group_size, symmetric)), [written], [48], 256)
    assert torch.allclose(layer(torch.eye(256)).t(), decompressed, atol=1e-6)
    # the package's own compressor writes the writer's bytes from the same scales and zero points
    if symmetric:
        zero = None
    else:
        zero = _signed_zero_points(weight, bits, strategy, group_size, scale)
    compressed = PackedQuantizationCompressor.compress(
        {"weight": weight, "weight_scale": scale, **({} if zero is None else {"weight_zero_point": zero})}, scheme)
    assert torch.equal(compressed["weight_packed"], written.tensors["weight_packed"])
    assert compressed["weight_shape"].tolist() == written.tensors["weight_shape"].tolist()
    if not symmetric:
        assert torch.equal(compressed["weight_zero_point"], written.tensors["weight_zero_point"])


def _signed_zero_points(weight, bits, strategy, group_size, scale) -> torch.Tensor:
    """The writer's zero points (int8, signed) for the package's compressor."""
    group = weight.shape[1] if strategy == "channel" else group_size
    low = weight.reshape(weight.shape[0], -1, group).amin(-1).clamp(max=0)
    low_code, high_code = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return torch.clamp(torch.round(low_code - low / scale), low_code, high_code).to(torch.int8)


@pytest.mark.parametrize("strategy, symmetric", [("channel", True), ("group", False)])
def test_int_quantized_int8_weights(strategy, symmetric):
    weights = [torch.randn(32, 128), torch.randn(16, 128)]
    written = [ct_quantize(w, 8, strategy, 64, symmetric, packed=False) for w in weights]
    method = ct_method(quantization_config(8, strategy, 64, symmetric, packed=False), key="compression_config")
    layer = loaded_layer(method, written, [32, 16], 128)
    x = torch.randn(3, 128)
    assert torch.allclose(layer(x), F.linear(x, torch.cat([t.dequantized for t in written])), atol=1e-4)


def test_ignore_keeps_layers_float_by_name_and_regex():
    method = ct_method(quantization_config(4, "group", 32, True, ignore=["lm_head", "re:.*mlp\\.down_proj$"]))
    assert method.method_for(("lm_head",)) is method.dense
    assert method.method_for(("model.layers.1.mlp.down_proj",)) is method.dense
    fused = method.method_for(("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"))
    assert isinstance(fused, CompressedTensorsLinearMethod) and fused.prefixes[1] == "model.layers.1.mlp.up_proj"
    unignored = ct_method(quantization_config(4, "group", 32, True, ignore=[]))
    assert unignored.method_for(("lm_head",)) is not unignored.dense  # a Linear like any other unless ignored
    mixed = ct_method(quantization_config(4, "group", 32, True, ignore=["model.layers.0.self_attn.k_proj"]))
    with pytest.raises(QuantizationError, match="fused into one layer but only some are quantized"):
        mixed.method_for(("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"))


def test_info_fields_come_from_the_linear_config_group():
    group = resolve_quantization(None, {"quantization_config": quantization_config(4, "group", 128, True)})
    assert (group.bits, group.group_size, group.describe()) == (4, 128, "compressed-tensors 4-bit, group size 128")
    channel = resolve_quantization(None, {"compression_config": quantization_config(8, "channel", None, True)})
    assert (channel.bits, channel.group_size) == (8, -1)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(format="float-quantized"), "float \\(fp8\\) weights .* not supported yet"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(type="float"), "float \\(fp8\\)"),
    (lambda c: c.update(format="marlin-24"), "format 'marlin-24'"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(strategy="tensor"), "weight strategy 'tensor'"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=3), "num_bits 3"),
    (lambda c: c.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    (lambda c: c["config_groups"].update(group_1=c["config_groups"]["group_0"]), "2 config_groups"),
])
def test_unsupported_configs_are_refused_by_name(change, message):
    config = quantization_config(4, "group", 32, True)
    change(config)
    with pytest.raises(QuantizationError, match=message):
        ct_method(config)


def test_tensors_contradicting_the_config_fail_naming_them():
    written = ct_quantize(torch.randn(16, 128), 4, "group", 64, True)  # written with groups of 64
    layer = Linear(128, [16], False, ct_method(quantization_config(4, "group", 32, True)), torch.float32,
                   torch.device("cpu"), prefixes=("model.layers.1.self_attn.o_proj",))
    layer.load(0, "weight_packed", written.tensors["weight_packed"])
    with pytest.raises(LinearLoadError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight_scale has shape \(16, 2\)"):
        layer.load(0, "weight_scale", written.tensors["weight_scale"])
    eight_bit = Linear(128, [16], False, ct_method(quantization_config(8, "group", 64, True)), torch.float32,
                       torch.device("cpu"), prefixes=("model.layers.1.self_attn.o_proj",))
    with pytest.raises(LinearLoadError, match=r"o_proj\.weight_packed has shape \(16, 16\).*expects \(16, 32\)"):
        eight_bit.load(0, "weight_packed", written.tensors["weight_packed"])


@pytest.mark.parametrize("parallel", [Parallel.REPLICATED, Parallel.COLUMN, Parallel.ROW])
def test_a_weight_shape_contradicting_the_layer_fails_on_every_split(parallel):
    """weight_shape states the whole module's [out, in]; a rank holding a slice checks it against the layer."""
    written = ct_quantize(torch.randn(16, 128), 4, "group", 32, True)
    written.tensors["weight_shape"] = torch.tensor([16, 120])
    layer = Linear(128, [16], False, ct_method(quantization_config(4, "group", 32, True)), torch.float32,
                   torch.device("cpu"), parallel, *((0, 1) if parallel is Parallel.REPLICATED else (1, 2)),
                   prefixes=("model.layers.0.mlp.down_proj",))
    layer.load(0, "weight_packed", written.tensors["weight_packed"])
    with pytest.raises(LinearLoadError, match=r"down_proj\.weight_shape says the module is \[16, 120\] \[out, in\], "
                                              r"but the model's layer is \[16, 128\]"):
        layer.load(0, "weight_shape", written.tensors["weight_shape"])


def act_order_g_idx(in_features: int, group_size: int, seed: int) -> torch.Tensor:
    """Each input's group under act-order: groups of `group_size` over a random order of the inputs."""
    order = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // group_size).to(torch.int32)
    return g_idx


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, True)])
def test_act_order_g_idx_groups_inputs_out_of_order(bits, symmetric):
    in_features, output_sizes = 128, [32, 16]
    g_idx = act_order_g_idx(in_features, 32, seed=bits + symmetric)
    written = [ct_quantize(torch.randn(size, in_features), bits, "group", 32, symmetric, g_idx=g_idx)
               for size in output_sizes]
    method = ct_method(quantization_config(bits, "group", 32, symmetric, actorder="group"))
    layer = loaded_layer(method, written, output_sizes, in_features)
    x = torch.randn(4, in_features)
    assert torch.allclose(layer(x), F.linear(x, torch.cat([t.dequantized for t in written])), atol=1e-4)


def test_act_order_needs_one_shared_g_idx():
    method = ct_method(quantization_config(4, "group", 32, True, actorder="group"))
    parts = [ct_quantize(torch.randn(16, 64), 4, "group", 32, True, g_idx=act_order_g_idx(64, 32, seed))
             for seed in (1, 2)]
    with pytest.raises(QuantizationError, match="the same for modules fused into one layer"):
        loaded_layer(method, parts, [16, 16], 64)
    missing = ct_quantize(torch.randn(16, 64), 4, "group", 32, True)  # no weight_g_idx written
    with pytest.raises(QuantizationError, match="needs one weight_g_idx per module"):
        loaded_layer(method, [missing], [16], 64)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_row_parallel_act_order_ranks_sum_to_the_whole_layer(world_size, symmetric):
    """int-quantized actorder "group": each rank's slice of the inputs holds parts of every group, so it
    loads the whole scales (and zero points) and reads each input's own column."""
    in_features, out_features = 256, 48
    g_idx = act_order_g_idx(in_features, 32, seed=world_size)
    written = ct_quantize(torch.randn(out_features, in_features), 8, "group", 32, symmetric, packed=False, g_idx=g_idx)
    x, width, partials = torch.randn(4, in_features), in_features // world_size, []
    for rank in range(world_size):
        layer = Linear(in_features, [out_features], False,
                       ct_method(quantization_config(8, "group", 32, symmetric, packed=False, actorder="group")),
                       torch.float32, torch.device("cpu"), Parallel.ROW, rank, world_size, prefixes=("m",))
        for name, tensor in written.tensors.items():
            layer.load(0, name, tensor)
        layer.finalize()
        partials.append(layer(x[:, rank * width:(rank + 1) * width]))
    assert torch.allclose(sum(partials), F.linear(x, written.dequantized), atol=1e-4)


def sharded_layers(method, written: list, output_sizes: list[int], in_features: int, parallel: Parallel,
                   world_size: int) -> list[Linear]:
    """Every rank's finalized layer of the fused checkpoint modules `written` (one per part)."""
    layers = []
    for rank in range(world_size):
        layer = Linear(in_features, output_sizes, False, method, torch.float32, torch.device("cpu"), parallel, rank,
                       world_size, prefixes=tuple(f"model.layers.0.mlp.part{i}" for i in range(len(output_sizes))))
        for part, tensors in enumerate(written):
            for name, tensor in tensors.tensors.items():
                layer.load(part, name, tensor)
        layer.finalize()
        layers.append(layer)
    return layers


SHARDED_LAYOUTS = [(4, True, True), (4, False, True), (8, False, True), (8, False, False), (8, True, False)]


@pytest.mark.parametrize("bits, symmetric, packed", SHARDED_LAYOUTS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_column_parallel_ranks_concatenate_to_the_whole_layer(bits, symmetric, packed, world_size):
    """Each rank's slice of every fused part's outputs, zero points packed along the outputs included
    (8 per int32 word at 4 bits: q's 64 rows are 8 words, 2 per rank at 4 ranks)."""
    torch.manual_seed(world_size + bits)
    in_features, output_sizes = 128, [64, 32, 32]
    written = [ct_quantize(torch.randn(size, in_features), bits, "group", 32, symmetric, packed=packed)
               for size in output_sizes]
    method = ct_method(quantization_config(bits, "group", 32, symmetric, packed=packed))
    layers = sharded_layers(method, written, output_sizes, in_features, Parallel.COLUMN, world_size)
    x = torch.randn(3, in_features)
    outputs = [layer(x).split([size // world_size for size in output_sizes], dim=-1) for layer in layers]
    got = torch.cat([outputs[rank][part] for part in range(len(output_sizes)) for rank in range(world_size)], -1)
    assert torch.allclose(got, F.linear(x, torch.cat([t.dequantized for t in written])), atol=1e-4)
    assert method.describe_loaded() is None  # every rank kept its codes


@pytest.mark.parametrize("bits, symmetric, packed", SHARDED_LAYOUTS)
@pytest.mark.parametrize("group_size, is_cut", [(16, False), (32, True)])
def test_row_parallel_ranks_sum_to_the_whole_layer_where_the_split_cuts_groups_or_not(bits, symmetric, packed,
                                                                                      group_size, is_cut):
    """The demo's down_proj: 352 inputs, 176 per rank at 2 ranks. Groups of 16 fall on the split, so both
    ranks keep grouped kernels; groups of 32 do not (rank 1 starts half-way into group 5): every rank
    holds the whole scales, rank 0 ends on a short group, rank 1 is dequantized at load and logged."""
    torch.manual_seed(bits + group_size)
    in_features, out_features = 352, 48
    written = ct_quantize(torch.randn(out_features, in_features), bits, "group", group_size, symmetric, packed=packed)
    method = ct_method(quantization_config(bits, "group", group_size, symmetric, packed=packed))
    layers = sharded_layers(method, [written], [out_features], in_features, Parallel.ROW, 2)
    x = torch.randn(3, in_features)
    partials = [layer(x[:, rank * 176:(rank + 1) * 176]) for rank, layer in enumerate(layers)]
    assert torch.allclose(sum(partials), F.linear(x, written.dequantized), atol=1e-4)
    kernels = [type(layer.prepared[0]).__name__ for layer in layers]
    assert kernels[0] != "DequantizedKernel" and (kernels[1] == "DequantizedKernel") is is_cut
    if is_cut:  # rank 1's float32 [48, 176] weight
        assert method.describe_loaded().startswith("1 quantized layer dequantized to float32 at load, 0.0 MiB: "
                                                   "model.layers.*.mlp.part0 x1 (this rank's slice")
        assert method.dequantized == [("model.layers.0.mlp.part0", 48 * 176 * 4)]
    else:
        assert method.describe_loaded() is None
