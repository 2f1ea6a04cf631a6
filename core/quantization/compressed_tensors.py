"""compressed-tensors checkpoints with integer weights, as llm-compressor writes them (`quant_method:
compressed-tensors`, in `quantization_config` or `compression_config`).

The config group that targets "Linear" gives `weights`: num_bits, strategy ("group": group_size inputs
per scale; "channel": one scale per output), symmetric. Per quantized module `m` of W [out, in], G groups:

  format "pack-quantized" (W4A16, W8A16), b bits, 32 / b codes per int32 word, little end first:
    m.weight_packed      int32 [out, in * b / 32]   codes offset by 2**(b-1) (signed value + 2**(b-1))
    m.weight_scale       float [out, G]             (channel: [out, 1])
    m.weight_zero_point  int32 [out * b / 32, G]    asymmetric only: zero points + 2**(b-1), packed along out
    m.weight_shape       int [2]                    the unpacked [out, in]
    m.weight_g_idx       int32 [in]                 actorder "group" only: each input's group
  format "int-quantized" (int8):
    m.weight             int8 [out, in]             signed codes
    m.weight_scale       float [out, G]
    m.weight_zero_point  int8 [out, G]              asymmetric only

W[o, i] = (signed code - signed zero) * scale[o, g(i)], g(i) = i // group_size (or weight_g_idx[i]), the
same as unsigned code minus unsigned zero, which is the common affine form; act-order becomes its
`input_perm` (inputs sorted stably by group; fused parts must share one g_idx). Layers listed in `ignore` (names, or "re:" regexes
matched from the start of the module name) stay float; lm_head is quantized unless ignored. Activation
quantization a config may carry (W8A8's input_activations) is not applied: activations stay in the run
dtype. Float (fp8) schemes, several config groups and a quantized KV cache (`kv_cache_scheme`) are
refused by name for now. Sharded, weight_shape is checked against the whole layer (`LinearParam.
is_part_shape`), and a row-parallel rank holds every group's scales and zero points (`act_order`).
"""
from __future__ import annotations

import copy
import re

import torch

from tgserve.core.layers.linear import LinearMethod, LinearParam
from tgserve.core.quantization.act_order import group_runs
from tgserve.core.quantization.method import QuantizedLinearMethod
from tgserve.core.quantization.quant_config import QuantizationConfig, QuantizationError, linear_weight_args
from tgserve.core.quantization.weight_only import AffineQuantizedWeight, WeightOnlyKernel

PACKED_BITS = (2, 4, 8)  # widths whose codes fill whole int32 words
STRATEGIES = ("group", "channel")


class CompressedTensorsLinearMethod(QuantizedLinearMethod):
    """Loads a layer's weight_packed (or int8 weight) / weight_scale / weight_zero_point / weight_shape and
    converts them to the common affine form."""

    name = "compressed-tensors"

    def __init__(self, quantization: QuantizationConfig, dtype: torch.dtype, dense: LinearMethod,
                 kernels: tuple[WeightOnlyKernel, ...] = ()):
        super().__init__(quantization, dtype, dense, kernels)
        section = quantization.checkpoint_config
        groups = section.get("config_groups") or {}
        if len(groups) != 1:
            raise QuantizationError(f"compressed-tensors: {len(groups)} config_groups in the checkpoint's "
                                    f"quantization_config; tgserve loads exactly one")
        group = next(iter(groups.values()))
        weights = linear_weight_args(section)
        self.format = group.get("format") or section.get("format")
        self.targets = list(group.get("targets") or [])
        self.ignore = list(section.get("ignore") or [])
        self.bits, self.group_size = quantization.bits, quantization.group_size
        self.is_symmetric = bool(weights.get("symmetric", True))
        self.is_act_order = str(weights.get("actorder")).lower() == "group"
        _check_supported(self.format, weights)
        if section.get("kv_cache_scheme"):
            raise QuantizationError("compressed-tensors: kv_cache_scheme (a quantized KV cache) is not supported yet")

    @property
    def is_packed(self) -> bool:
        return self.format == "pack-quantized"

    def is_quantized_layer(self, prefixes: tuple[str, ...]) -> bool:
        """A layer is quantized when its modules match the group's targets ("Linear", a name, "re:...")
        and none is ignored; a fused layer whose parts disagree cannot load."""
        chosen = [self._is_target(name) and not any(_matches(name, entry) for entry in self.ignore)
                  for name in prefixes]
        if len(set(chosen)) > 1:
            raise QuantizationError(f"compressed-tensors: {', '.join(prefixes)} are fused into one layer but "
                                    f"only some are quantized (config_groups targets / ignore)")
        return bool(chosen) and chosen[0]

    def _is_target(self, name: str) -> bool:
        return any(target == "Linear" or _matches(name, target) for target in self.targets)

    def method_for(self, prefixes: tuple[str, ...]) -> LinearMethod:
        """The dense method for float layers; for quantized ones a copy bound to the layer's names (for
        the start-up log), sharing this method's ledger of dequantized layers."""
        if not self.is_quantized_layer(prefixes):
            return self.dense
        bound = copy.copy(self)
        bound.prefixes = prefixes
        return bound

    def create_params(self, in_features: int, output_sizes: list[int], has_bias: bool,
                      dtype: torch.dtype, device: torch.device) -> dict[str, LinearParam]:
        out_features, num_parts = sum(output_sizes), len(output_sizes)
        # A group that does not divide in_features is no refusal: a row-parallel rank's slice may end
        # mid-group, and a whole layer's weight_scale shape (checked at load) says how many groups it has.
        group = in_features if self.group_size == -1 else self.group_size
        num_groups, pack = -(-in_features // group), 32 // self.bits
        # Every group's scales are whole on every row-parallel rank (`is_input_whole`): a rank's slice of
        # the inputs may start or end inside a group, and under act-order it reads groups all over the
        # layer; `to_affine` keeps the columns its inputs read. Per channel, the one column is every rank's.
        group_dim = None if self.group_size == -1 else 1
        is_grouped = group_dim is not None
        params = {"weight_scale": LinearParam(torch.empty(out_features, num_groups, dtype=torch.float32,
                                                          device=device),
                                              output_dim=0, input_dim=group_dim, input_pack=group,
                                              is_input_whole=is_grouped)}
        if is_grouped:  # where this rank's inputs sit in the layer: their groups, without act-order
            params["input_positions"] = LinearParam(torch.empty(in_features, dtype=torch.int64, device=device),
                                                    output_dim=None, input_dim=0, is_input_positions=True)
        if self.is_packed:
            params["weight_packed"] = LinearParam(torch.empty(out_features, in_features // pack, dtype=torch.int32,
                                                              device=device), output_dim=0, input_dim=1,
                                                  input_pack=pack)
            # the module's whole [out, in], checked by `Linear.load` against the layer (not this rank's slice)
            params["weight_shape"] = LinearParam(torch.zeros(num_parts, 2, dtype=torch.int64, device=device),
                                                 output_dim=None, is_per_part=True, is_part_shape=True)
        else:
            params["weight"] = LinearParam(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                           output_dim=0, input_dim=1)
        if self.is_act_order:  # -1: the part's weight_g_idx is missing
            params["weight_g_idx"] = LinearParam(torch.full((num_parts, in_features), -1, dtype=torch.int32,
                                                            device=device), output_dim=None, input_dim=0,
                                                 is_per_part=True)
        if not self.is_symmetric:
            zero_pack = pack if self.is_packed else 1
            zero_dtype = torch.int32 if self.is_packed else torch.int8
            params["weight_zero_point"] = LinearParam(
                torch.empty(out_features // zero_pack, num_groups, dtype=zero_dtype, device=device),
                output_dim=0, input_dim=group_dim, output_pack=zero_pack, input_pack=group,
                is_input_whole=is_grouped)
        if has_bias:
            params["bias"] = LinearParam(torch.zeros(out_features, dtype=dtype, device=device), output_dim=0)
        return params

    def to_affine(self, params: dict[str, torch.Tensor]) -> AffineQuantizedWeight:
        offset = 1 << (self.bits - 1)
        scales = params["weight_scale"]  # [out, groups]: every group's column, on a row-parallel rank too
        if self.is_packed:
            q = unpack_words(params["weight_packed"], self.bits)  # [out, in], unsigned (offset) codes
        else:
            q = (params["weight"].to(torch.int16) + offset).to(torch.uint8)
        if self.is_symmetric:
            zeros = torch.full_like(scales, float(offset))
        elif self.is_packed:
            zeros = unpack_words(params["weight_zero_point"].t(), self.bits).t().float()
        else:
            zeros = params["weight_zero_point"].float() + offset
        if self.group_size == -1:  # per output channel
            return AffineQuantizedWeight(q=q, scales=scales, zeros=zeros.contiguous(), bits=self.bits,
                                         group_size=q.shape[1], input_perm=None, bias=params.get("bias"))
        group = self.group_size
        groups = (_act_order_groups(params["weight_g_idx"]) if self.is_act_order
                  else params["input_positions"] // group)
        runs = group_runs(groups, group)
        if runs is None and scales.shape[1] == -(-q.shape[1] // group):  # a whole layer: the g_idx is wrong
            raise QuantizationError(f"compressed-tensors: weight_g_idx does not put {group} inputs in each group")
        if runs is None:  # a row-parallel slice that cuts groups: every input keeps its group's column
            return AffineQuantizedWeight(q=q, scales=scales, zeros=zeros.contiguous(), bits=self.bits,
                                         group_size=group, input_perm=None, bias=params.get("bias"),
                                         input_groups=groups)
        if runs.input_perm is not None:
            q = q.index_select(1, runs.input_perm)
        return AffineQuantizedWeight(q=q, scales=scales[:, runs.group_rows].contiguous(),
                                     zeros=zeros[:, runs.group_rows].contiguous(), bits=self.bits,
                                     group_size=group, input_perm=runs.input_perm, bias=params.get("bias"))


def unpack_words(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows, words], 32 / bits codes per word with the first in the lowest bits -> uint8 [rows, codes]."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1).to(torch.uint8)


def _act_order_groups(g_idx: torch.Tensor) -> torch.Tensor:
    """weight_g_idx [num_parts, in] -> each input's group (its column of the scales), int64 [in]."""
    if (g_idx[0] == -1).all() or not all(torch.equal(row, g_idx[0]) for row in g_idx):
        raise QuantizationError("compressed-tensors: actorder \"group\" needs one weight_g_idx per module, the "
                                "same for modules fused into one layer (q/k/v, gate/up)")
    return g_idx[0].long()


def _matches(name: str, entry: str) -> bool:
    """compressed-tensors' name matching: "re:PATTERN" matches from the start of the name, else equality."""
    return re.match(entry[3:], name) is not None if entry.startswith("re:") else entry == name


def _check_supported(format_name: str | None, weights: dict) -> None:
    if weights.get("type", "int") == "float" or format_name == "float-quantized":
        raise QuantizationError("compressed-tensors: float (fp8) weights (format float-quantized) are not "
                                "supported yet; tgserve loads int-quantized and pack-quantized checkpoints")
    if format_name not in ("pack-quantized", "int-quantized"):
        raise QuantizationError(f"compressed-tensors: format {format_name!r} in the checkpoint's "
                                f"quantization_config; tgserve loads pack-quantized and int-quantized")
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    allowed = PACKED_BITS if format_name == "pack-quantized" else (8,)
    if bits not in allowed:
        raise QuantizationError(f"compressed-tensors: num_bits {bits} with format {format_name}; tgserve "
                                f"loads {', '.join(map(str, allowed))}")
    if strategy not in STRATEGIES:
        raise QuantizationError(f"compressed-tensors: weight strategy {strategy!r}; tgserve loads "
                                f"{' and '.join(STRATEGIES)}")
    if strategy == "group" and not (weights.get("group_size") or 0) > 0:
        raise QuantizationError(f"compressed-tensors: group strategy with group_size {weights.get('group_size')}")
