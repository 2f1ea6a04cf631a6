"""GPTQ checkpoints in the Hugging Face layout (AutoGPTQ, GPTQModel, transformers' GPTQConfig).

Per quantized module `m` of W [out, in], with b bits (2, 3, 4 or 8) and G = ceil(in / group_size) groups
(group_size -1: one group of all inputs):

    m.qweight  int32 [in * b / 32, out]  codes along the inputs
    m.qzeros   int32 [G, out * b / 32]   zero points along the outputs
    m.scales   float16 [G, out]
    m.g_idx    int32 [in], optional      each input's group; not monotone under act-order (desc_act)

Both packed tensors are little-endian bit streams in 32-bit words: value k of a run sits at bits
[k * b, (k + 1) * b); for b = 3 a run is 32 values in 3 words and values 10 and 21 straddle two words.
W[o, i] = (q[i, o] - zero[g_idx[i], o]) * scale[g_idx[i], o]. AutoGPTQ's v1 format (`checkpoint_format`
"gptq" or absent) stores zero - 1; GPTQModel's "gptq_v2" stores the zero itself. Act-order becomes the
common form's `input_perm`: inputs sorted (stably) by group, so groups are contiguous.

Which layers: lm_head stays float unless `lm_head: true`; `modules_to_not_convert` stays float; GPTQModel's
`dynamic` maps regexes over module names to "-:" (left float) or "+:" / bare (its bits, group_size, ...
override the config's for that module); the first matching rule wins.
"""
from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

import torch
import torch.nn.functional as F

from tgserve.core.layers.linear import LinearMethod, LinearParam
from tgserve.core.quantization.act_order import group_runs
from tgserve.core.quantization.method import QuantizedLinearMethod, _listed
from tgserve.core.quantization.quant_config import QuantizationConfig, QuantizationError
from tgserve.core.quantization.weight_only import AffineQuantizedWeight, WeightOnlyKernel

GPTQ_BITS = (2, 3, 4, 8)
_CHECKPOINT_FORMATS = {None: 1, "gptq": 1, "gptq_v2": 2}  # checkpoint_format -> zero-point convention
_SKIP = "skip"  # a `dynamic` rule or modules_to_not_convert leaves the module in float


class GptqLinearMethod(QuantizedLinearMethod):
    """Loads a layer's qweight / qzeros / scales / g_idx and converts them to the common affine form.

    The instance the hook returns reads the checkpoint's config; `method_for` hands each layer a copy
    bound to its module names (for errors) and its own bits / group size where `dynamic` overrides them.
    """

    name = "gptq"

    def __init__(self, quantization: QuantizationConfig, dtype: torch.dtype, dense: LinearMethod,
                 kernels: tuple[WeightOnlyKernel, ...] = (), prefixes: tuple[str, ...] = (),
                 dequantized: list[tuple[str, int]] | None = None):
        super().__init__(quantization, dtype, dense, kernels, prefixes, dequantized)
        section = quantization.checkpoint_config
        if quantization.bits not in GPTQ_BITS:
            raise QuantizationError(f"gptq: bits {quantization.bits} in the checkpoint's quantization_config; "
                                    f"tgserve loads {', '.join(map(str, GPTQ_BITS))}")
        if quantization.group_size is None or not (quantization.group_size == -1 or quantization.group_size > 0):
            raise QuantizationError(f"gptq: group_size {quantization.group_size} in the checkpoint's "
                                    f"quantization_config; expected -1 or a positive size")
        checkpoint_format = section.get("checkpoint_format", section.get("format"))
        if checkpoint_format not in _CHECKPOINT_FORMATS:
            raise QuantizationError(f"gptq: checkpoint_format {checkpoint_format!r} is not the Hugging Face "
                                    f"layout tgserve loads (gptq or gptq_v2)")
        self.zero_offset = 1 if _CHECKPOINT_FORMATS[checkpoint_format] == 1 else 0  # v1 stores zero - 1

    def method_for(self, prefixes: tuple[str, ...]) -> LinearMethod:
        rules = [self._rule(name) for name in prefixes]
        if any(rule != rules[0] for rule in rules):
            raise QuantizationError(f"gptq: the fused modules {', '.join(prefixes)} are not quantized alike "
                                    f"(lm_head, modules_to_not_convert or dynamic)")
        rule = rules[0] if rules else {}
        if rule == _SKIP:
            return self.dense
        quantization = self.quantization
        if rule:
            quantization = dataclasses.replace(
                quantization, bits=int(rule.get("bits", quantization.bits)),
                group_size=int(rule.get("group_size", quantization.group_size)),
                checkpoint_config={**quantization.checkpoint_config, **rule})
        return GptqLinearMethod(quantization, self.dtype, self.dense, self.kernels, prefixes, self.dequantized)

    def _rule(self, name: str) -> dict | str:
        """_SKIP when module `name` stays float, else its `dynamic` overrides ({} for none)."""
        section = self.quantization.checkpoint_config
        if (name == "lm_head" and not section.get("lm_head")) or _listed(name, section.get("modules_to_not_convert")
                                                                          or []):
            return _SKIP
        for pattern, overrides in (section.get("dynamic") or {}).items():
            is_skip = pattern.startswith("-:")
            if re.match(pattern[2:] if pattern[:2] in ("-:", "+:") else pattern, name):
                return _SKIP if is_skip else dict(overrides)
        return {}

    def create_params(self, in_features: int, output_sizes: list[int], has_bias: bool,
                      dtype: torch.dtype, device: torch.device) -> dict[str, LinearParam]:
        bits, group_size = self.quantization.bits, self.quantization.group_size
        per_word = Fraction(32, bits) if 32 % bits else 32 // bits  # codes per int32 word
        group = in_features if group_size == -1 else group_size
        num_groups, out_features = -(-in_features // group), sum(output_sizes)
        # Every group's row is whole on every row-parallel rank (`is_input_whole`): a rank's slice of the
        # inputs may start or end inside a group (groups of 32 over 176 inputs), and under act-order it
        # reads groups all over the layer; `to_affine` keeps the rows its inputs read. One group for the
        # whole layer (group_size -1) has no input dim: its one row is every rank's.
        group_dim = None if group_size == -1 else 0
        is_grouped = group_dim is not None
        params = {
            "qweight": LinearParam(torch.empty(in_features * bits // 32, out_features, dtype=torch.int32,
                                               device=device), output_dim=1, input_dim=0, input_pack=per_word),
            "qzeros": LinearParam(torch.empty(num_groups, out_features * bits // 32, dtype=torch.int32,
                                              device=device), output_dim=1, output_pack=per_word,
                                  input_dim=group_dim, input_pack=group, is_input_whole=is_grouped),
            # float32 holds the checkpoint's float16 or bfloat16 scales exactly
            "scales": LinearParam(torch.empty(num_groups, out_features, dtype=torch.float32, device=device),
                                  output_dim=1, input_dim=group_dim, input_pack=group, is_input_whole=is_grouped),
            # -1: the checkpoint has no g_idx for that part (inputs then in group order)
            "g_idx": LinearParam(torch.full((len(output_sizes), in_features), -1, dtype=torch.int32,
                                            device=device), output_dim=None, input_dim=0, is_per_part=True),
            # where this rank's inputs sit in the layer: their groups where the checkpoint has no g_idx
            "input_positions": LinearParam(torch.empty(in_features, dtype=torch.int64, device=device),
                                           output_dim=None, input_dim=0, is_input_positions=True),
        }
        if has_bias:
            params["bias"] = LinearParam(torch.zeros(out_features, dtype=dtype, device=device), output_dim=0)
        return params

    def to_affine(self, params: dict[str, torch.Tensor]) -> AffineQuantizedWeight:
        bits = self.quantization.bits
        codes = unpack_codes(params["qweight"], bits, dim=0)  # [in, out]: this rank's inputs
        in_features = codes.shape[0]
        group = in_features if self.quantization.group_size == -1 else self.quantization.group_size
        zeros = unpack_codes(params["qzeros"], bits, dim=1).float() + self.zero_offset  # [groups, out]
        scales = params["scales"]  # [groups, out]: every group's row, on a row-parallel rank too
        groups = self._groups(params["g_idx"], params["input_positions"])
        runs = group_runs(groups, group)
        perm, input_groups = None, None
        if runs is None and scales.shape[0] == -(-in_features // group):  # a whole layer: the g_idx is wrong
            raise QuantizationError(f"gptq: {self._g_idx_names(1)[0]} does not put {group} inputs in each "
                                    f"group (group_size {self.quantization.group_size} in the config)")
        if runs is None:  # a row-parallel slice that cuts groups: every input keeps its group's row
            input_groups = groups
        else:  # whole groups (the last may be short): the rows of this rank's groups, in run order
            perm, zeros, scales = runs.input_perm, zeros[runs.group_rows], scales[runs.group_rows]
        if perm is not None:
            codes = codes.index_select(0, perm)
        return AffineQuantizedWeight(q=codes.t().contiguous(), scales=scales.t().contiguous(),
                                     zeros=zeros.t().contiguous(), bits=bits, group_size=group, input_perm=perm,
                                     bias=params.get("bias"), input_groups=input_groups)

    def _g_idx_names(self, num_parts: int) -> list[str]:
        return [f"{prefix}.g_idx" for prefix in self.prefixes] or ["g_idx"] * num_parts

    def _groups(self, g_idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """g_idx [num_parts, in] (-1 rows: absent) and positions int64 [in] (where this rank's inputs sit in
        the layer) -> each input's row of the layer's whole scales, int64 [in]: the checkpoint's g_idx
        where it has one, else the inputs' groups in order (position // group_size)."""
        names = self._g_idx_names(g_idx.shape[0])
        is_present = (g_idx != -1).any(dim=1).tolist()
        if not any(is_present):
            if self.quantization.checkpoint_config.get("desc_act"):
                raise QuantizationError(f"gptq: {names[0]} is missing but desc_act (act-order) is true")
            group_size = self.quantization.group_size
            return torch.zeros_like(positions) if group_size == -1 else positions // group_size
        for part in range(g_idx.shape[0]):
            if not is_present[part] or not torch.equal(g_idx[part], g_idx[0]):
                raise QuantizationError(f"gptq: {names[part]} differs from {names[0]} (or one is missing); "
                                        f"fused modules must share one input order")
        return g_idx[0].long()


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding a little-endian stream of `bits`-bit codes along `dim` -> uint8 codes, with
    `dim` 32 / bits times longer (for 3 bits, every 3 words hold 32 codes)."""
    words = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    first_bit = torch.arange(words.shape[-1] * 32 // bits, device=packed.device) * bits
    word, shift = first_bit // 32, first_bit % 32
    padded = F.pad(words, (0, 1))  # a zero word after the last, for codes that would straddle it
    # low bits from the code's word, high bits (where it straddles, for 3 bits) from the next word
    values = (padded[..., word] >> shift) | (padded[..., word + 1] << (32 - shift))
    return (values & ((1 << bits) - 1)).to(torch.uint8).movedim(-1, dim)
