"""What `tgserve quantize` accepts, checked before any work: the source checkpoint, the layout, the output.

Every refusal is a `QuantizeRefused` whose message says what is wrong and what to do.
"""
from __future__ import annotations

import json
from pathlib import Path

from tgserve.checkpoints.quantize.affine import QuantSpec

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")  # decoder layers with q/k/v/o and gate/up/down projections
GPTQ_BITS = (2, 4, 8)  # the widths that divide a 32-bit word (3-bit packing is not written)
AWQ_BITS = (4,)
LM_HEAD_BITS = (4, 8)  # --lm-head-bits (gptq): 2-bit heads lose too much; 3-bit packing is not written
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class QuantizeRefused(Exception):
    """`tgserve quantize` cannot do what was asked; raised before any model is loaded or file written."""


def check_source(model_dir: Path) -> dict:
    """The float checkpoint's config.json, after checking it is one `tgserve quantize` can handle."""
    if not model_dir.is_dir():
        raise QuantizeRefused(f"{model_dir} is not a folder (MODEL_DIR is a Hugging Face checkpoint folder)")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise QuantizeRefused(f"{model_dir} has no config.json: not a Hugging Face checkpoint")
    config = json.loads(config_path.read_text())
    section = config.get("quantization_config") or config.get("compression_config")
    if section:
        method = section.get("quant_method", "compressed-tensors") if isinstance(section, dict) else section
        raise QuantizeRefused(f"{model_dir} is already quantized ({method}); quantize its float original")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QuantizeRefused(f"model_type {model_type!r} is not supported by tgserve quantize "
                              f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if not list(model_dir.glob("*.safetensors")):
        raise QuantizeRefused(f"{model_dir} has no *.safetensors weights")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise QuantizeRefused(f"{model_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): it is needed "
                              f"for the calibration text and is copied into the output")
    return config


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each decoder-layer linear, from config.json."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    num_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // num_heads
    kv = config.get("num_key_value_heads", num_heads) * head_dim
    return {"q_proj": (hidden, num_heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (num_heads * head_dim, hidden), "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn),
            "down_proj": (ffn, hidden)}


def check_layout(config: dict, spec: QuantSpec) -> None:
    """Refuse bits, group sizes and options the format cannot store for this model's linear shapes."""
    if spec.method == "gptq":
        if spec.bits not in GPTQ_BITS:
            raise QuantizeRefused(f"gptq --bits {spec.bits} is not supported (supported: {GPTQ_BITS})")
    elif spec.bits not in AWQ_BITS:
        raise QuantizeRefused(f"awq stores 4-bit weights only (--bits 4), not {spec.bits}")
    if spec.method == "awq" and (spec.is_act_order or spec.is_sym):
        raise QuantizeRefused("--act-order and --sym are GPTQ options; AWQ GEMM is asymmetric, without act-order")
    is_per_row = spec.group_size == -1
    if (spec.group_size <= 0 and not is_per_row) or (spec.method == "awq" and is_per_row):
        raise QuantizeRefused(f"--group-size {spec.group_size} is not valid for {spec.method} "
                              f"(a positive size{', or -1 for one group per output' if spec.method == 'gptq' else ''})")
    _check_head(config, spec)
    per_word = 32 // spec.bits
    for name, (in_features, out_features) in linear_shapes(config).items():
        if spec.method == "gptq" and (in_features % per_word or out_features % per_word):
            raise QuantizeRefused(f"{name} [{out_features} x {in_features}] cannot be packed {per_word} "
                                  f"values per int32 word")
        if spec.method == "awq" and (out_features % 8 or in_features % spec.group_size):
            raise QuantizeRefused(f"{name} has {in_features} inputs and {out_features} outputs: AWQ needs "
                                  f"inputs divisible by --group-size {spec.group_size} and outputs by 8")


def _check_head(config: dict, spec: QuantSpec) -> None:
    """Refuse --lm-head-bits outside LM_HEAD_BITS, with awq, or for a head the packing cannot hold."""
    if spec.lm_head_bits is None:
        return
    if spec.method != "gptq":
        raise QuantizeRefused("--lm-head-bits is a gptq option (AutoAWQ's format keeps lm_head float)")
    if spec.lm_head_bits not in LM_HEAD_BITS:
        raise QuantizeRefused(f"--lm-head-bits {spec.lm_head_bits} is not supported (supported: "
                              f"{', '.join(map(str, LM_HEAD_BITS))}; omit it for a float lm_head)")
    per_word = 32 // spec.lm_head_bits
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    if vocab % per_word or hidden % per_word:
        raise QuantizeRefused(f"lm_head [{vocab} x {hidden}] cannot be packed {per_word} values per int32 word")


def check_output(out_dir: Path) -> None:
    """Refuse an OUT_DIR that exists (never overwrite a checkpoint) or whose parent does not."""
    if out_dir.exists():
        raise QuantizeRefused(f"{out_dir} already exists; give a new folder for the quantized checkpoint")
    if not out_dir.parent.is_dir():
        raise QuantizeRefused(f"{out_dir.parent} does not exist")
