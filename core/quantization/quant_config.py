"""Which quantization a model runs with: the checkpoint's `quantization_config` reconciled with `--quantize`.

TGI's rules (its `get_loader`): `quant_method` in the checkpoint's config.json names the method
(`fbgemm_fp8` means `fp8`; compressed-tensors may also sit under `compression_config`); an explicit
`--quantize` that contradicts a pre-quantized checkpoint is an error; a method that quantizes at load
(eetq, fp8 on a float checkpoint, bitsandbytes-nf4) needs only the flag.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tgserve.core.config import ConfigError

# quant_method spellings in checkpoints -> tgserve's (TGI's) method name
_CHECKPOINT_METHODS = {"gptq": "gptq", "awq": "awq", "fp8": "fp8", "fbgemm_fp8": "fp8",
                       "compressed-tensors": "compressed-tensors", "compressed_tensors": "compressed-tensors",
                       "exl2": "exl2", "marlin": "marlin", "bitsandbytes": "bitsandbytes",
                       "gguf": "gguf"}  # a GGUF file's quantized tensors (core/gguf_source.py writes this one)
# Methods that only read pre-quantized checkpoints: the flag on a float checkpoint is TGI's load error.
PREQUANTIZED_ONLY = ("gptq", "awq", "compressed-tensors")
# (bits, group size) of the methods that quantize a float checkpoint at load.
AT_LOAD_LAYOUTS = {"bitsandbytes-nf4": (4, 64), "eetq": (8, -1), "fp8": (8, -1)}
# At-load methods that also quantize lm_head (and so, on a tied model, the output use of the embedding).
# The others keep it float, as the reference tools do by default: transformers' bitsandbytes integration
# (`get_keys_to_not_convert` skips the output embedding), llm-compressor's FP8 recipes (`ignore=["lm_head"]`),
# vLLM's at-load fp8 (linear layers only). Measured on SmolLM2-135M (tied, 49152 x 576, the largest matrix):
# keeping it float took NF4 from +39% to +25.5% perplexity, fp8 from +2.9% to +1.8% (BENCHMARKS.md,
# quality). eetq keeps int8 on lm_head (+0.03% in all; the head is a third of a small model's decode bytes).
AT_LOAD_QUANTIZED_HEAD = ("eetq",)


class QuantizationError(ConfigError):
    """The checkpoint's quantization and the flags cannot work together, or a quantized tensor
    contradicts the checkpoint's config. The message names the flag or the tensor."""


@dataclass(slots=True, frozen=True)
class QuantizationConfig:
    """The quantization a model loads with, settled once at start-up (host side, no tensors)."""

    method: str  # TGI's name: "gptq", "awq", "compressed-tensors", "eetq", "fp8", "bitsandbytes-nf4", "gguf"
    is_prequantized: bool  # the checkpoint holds quantized tensors (else the float weights quantize at load)
    bits: int | None = None  # weight bits (4, 8, ...); None where the method has no such notion
    group_size: int | None = None  # input features per scale; -1: one scale per output channel
    # The checkpoint's `quantization_config` as written (format details: desc_act, sym, zero_point,
    # checkpoint_format, config_groups, weight_block_size, modules_to_not_convert / ignore ...).
    checkpoint_config: dict = field(default_factory=dict)

    @property
    def is_lm_head_quantized(self) -> bool:
        """Whether lm_head is quantized at load: only by AT_LOAD_QUANTIZED_HEAD's methods. A pre-quantized
        checkpoint says so itself (GPTQ's `lm_head: true`, compressed-tensors unless `ignore`d), read by its
        format's `method_for`."""
        return not self.is_prequantized and self.method in AT_LOAD_QUANTIZED_HEAD

    def describe(self) -> str:
        """One phrase for the start-up log and /info: "gptq 4-bit, group size 128"."""
        parts = [self.method]
        if self.bits is not None:
            parts.append(f"{self.bits}-bit")
        text = " ".join(parts)
        if self.group_size is not None:
            text += ", per output channel" if self.group_size == -1 else f", group size {self.group_size}"
        if self.is_prequantized:  # GPTQModel's `lm_head: true` (`tgserve quantize --lm-head-bits`) is worth a word
            return text + (", lm_head quantized" if self.checkpoint_config.get("lm_head") is True else "")
        return text + (" (quantized at load)" if self.is_lm_head_quantized else " (quantized at load, lm_head float)")


    def as_info(self) -> dict:
        """What /info reports."""
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                "is_prequantized": self.is_prequantized, "description": self.describe()}


def checkpoint_quantization(raw_config: dict) -> dict | None:
    """The checkpoint's quantization section (`quantization_config`, or compressed-tensors'
    `compression_config`), with `quant_method` normalised to tgserve's name; None for a float checkpoint."""
    section = raw_config.get("quantization_config") or raw_config.get("compression_config")
    if not section:
        return None
    raw_method = section.get("quant_method") or ("compressed-tensors" if "config_groups" in section else None)
    method = _CHECKPOINT_METHODS.get(str(raw_method).lower())
    if method is None:
        raise QuantizationError(f"the checkpoint's quantization_config has quant_method {raw_method!r}, "
                                f"which tgserve cannot load")
    return {**section, "quant_method": method}


def resolve_quantization(flag: str | None, raw_config: dict) -> QuantizationConfig | None:
    """The method to load with, from `--quantize` (None: not given) and the checkpoint's config.json.

    Raises QuantizationError when the flag contradicts the checkpoint, or asks a pre-quantized-only
    method of a float checkpoint (TGI: "Cannot load `gptq` weight, make sure the model is already quantized").
    """
    section = checkpoint_quantization(raw_config)
    detected = None if section is None else section["quant_method"]
    if flag is not None and detected == "gguf":
        raise QuantizationError(f"`--quantize {flag}` does not apply to a GGUF model, whose tensors are already "
                                f"quantized ({section.get('file_type') or 'gguf'}); drop the flag")
    if flag is not None and detected is not None and flag != detected:
        raise QuantizationError(f"`--quantize {flag}` contradicts the checkpoint, which is quantized with "
                                f"{detected} (its config.json quantization_config); drop the flag or pass "
                                f"`--quantize {detected}`")
    method = flag or detected
    if method is None:
        return None
    if detected is None and method in PREQUANTIZED_ONLY:
        raise QuantizationError(f"Cannot load `{method}` weight, make sure the model is already quantized "
                                f"(its config.json has no quantization_config)")
    if section is None:
        bits, group_size = AT_LOAD_LAYOUTS.get(method, (None, None))
        return QuantizationConfig(method=method, is_prequantized=False, bits=bits, group_size=group_size)
    layout = _weight_layout(section)
    return QuantizationConfig(method=method, is_prequantized=True, bits=_bits(layout),
                              group_size=_group_size(layout), checkpoint_config=section)


def _bits(section: dict) -> int | None:
    bits = section.get("bits", section.get("w_bit"))
    if bits is None and section["quant_method"] == "fp8":  # e4m3: 8 bits, written nowhere in the config
        return 8
    return None if bits is None else int(bits)


def _group_size(section: dict) -> int | None:
    size = section.get("group_size", section.get("q_group_size"))
    if size is None and section.get("weight_block_size"):  # fp8 blocks [out, in]: inputs per scale
        return int(section["weight_block_size"][1])
    return None if size is None else int(size)


def linear_weight_args(section: dict) -> dict | None:
    """compressed-tensors' `weights` arguments (num_bits, strategy, group_size, symmetric, type, ...)
    of the config group that targets Linear layers (or the only group); None where there are no groups."""
    groups = list((section.get("config_groups") or {}).values())
    linear = [group for group in groups if "Linear" in (group.get("targets") or [])]
    chosen = linear or groups[:1]
    return None if not chosen else (chosen[0].get("weights") or {})


def _weight_layout(section: dict) -> dict:
    """`section` with compressed-tensors' per-group bits and group size lifted to the top level
    (channel strategy: group size -1), so the start-up log and /info name them as for GPTQ / AWQ."""
    weights = linear_weight_args(section)
    if weights is None:
        return section
    size = -1 if weights.get("strategy") == "channel" else weights.get("group_size")
    return {**section, "bits": weights.get("num_bits"), "group_size": size}
