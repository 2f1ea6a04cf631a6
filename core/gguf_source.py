"""A GGUF file as a checkpoint: config, tokenizer and weights all come from the file (read with `gguf`).

The metadata (`llama.block_count`, `llama.attention.head_count`, ...) becomes a config.json-shaped
dict. When linear tensors are quantized it carries `quantization_config` {"quant_method": "gguf",
"tensor_types": {checkpoint module: GGUF type}, ...}, so `resolve_quantization` settles on the gguf
method (`core/quantization/gguf.py`) as for any pre-quantized checkpoint. Tensors get the Hugging Face
names the models load (`blk.0.attn_q.weight` -> `model.layers.0.self_attn.q_proj.weight`); layers
`is_kept_quantized` keeps come as raw blocks (suffix "blocks"), everything else dequantized to float32
by `gguf.quants.dequantize`. llama.cpp's converter permutes the rows of a llama model's q and k
projections for its rotary layout; they are permuted back here, as transformers' GGUF loader does.
A file without output.weight ties lm_head to token_embd: lm_head gets the embedding's blocks.
"""
from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch
from tqdm import tqdm

from tgserve.core.config import ConfigError
from tgserve.core.quantization.gguf import AFFINE_TYPES, BLOCK_INPUTS, is_kept_quantized
from tgserve.core.tokenizer import Tokenizer

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # general.architecture -> model_type
_PERMUTED_QK = {"llama"}  # architectures whose q/k rows llama.cpp's converter permuted
# GGUF per-block tensor -> module under model.layers.N
_LAYER_MODULES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                  "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj"}
_MODULES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_NORMS = {"attn_norm", "ffn_norm", "output_norm"}
_FUSED = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))  # GGUF tensors the model fuses into one layer
_FLOAT_TYPES = {"F32", "F16", "BF16"}


class GgufError(ConfigError):
    """A GGUF file tgserve cannot serve: its architecture, a tensor type, or a tensor it has no place for."""


class GgufCheckpoint:
    """One GGUF file, opened (memory-mapped) and checked at start-up; tensors are read as they load."""

    def __init__(self, path: Path):
        self.path = path
        self.reader = gguf.GGUFReader(str(path))
        self.architecture = str(self._field("general.architecture"))
        if self.architecture not in ARCHITECTURES:
            raise GgufError(f"GGUF architecture {self.architecture!r} of {path.name} is not supported "
                            f"(supported: {', '.join(sorted(ARCHITECTURES))})")
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        self.modules = {name: _module_name(name, self.architecture) for name in self.tensors}
        for name, tensor in self.tensors.items():
            if not _is_readable(tensor.tensor_type):
                raise GgufError(f"GGUF tensor {name} has type {tensor.tensor_type.name}, which tgserve cannot "
                                f"load (gguf {_gguf_version()} has no dequantization for it)")
        self.raw_config = self._config()
        # linear weights handed over as blocks; and whether a tied lm_head gets the embedding's blocks
        self._kept = {name for group in self._linear_groups() if is_kept_quantized(self._types(group))
                      for name in group}
        self._is_tied_head_kept = (self.raw_config["tie_word_embeddings"]
                                   and is_kept_quantized(self._types(["token_embd.weight"])))

    def tokenizer(self, eos_token_ids: tuple[int, ...], trust_remote_code: bool = False) -> Tokenizer:
        """transformers' tokenizer built from the file's `tokenizer.ggml.*` metadata and chat template."""
        return Tokenizer(self.path.parent, eos_token_ids, trust_remote_code, gguf_file=self.path.name)

    def iter_weights(self, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor) for every tensor: raw uint8 blocks [out, in / 32, block bytes] as
        "<module>.blocks" for kept-quantized linears, float32 (F16: float16) for the rest."""
        with tqdm(total=sum(t.n_bytes for t in self.tensors.values()), unit="B", unit_scale=True,
                  desc="Loading GGUF weights", disable=not progress) as bar:
            for name, tensor in self.tensors.items():
                yield self._hf_name(name), self._read(name)
                bar.update(tensor.n_bytes)
            if self.raw_config["tie_word_embeddings"]:  # lm_head is the embedding, its blocks where kept
                kind = "blocks" if self._is_tied_head_kept else "weight"
                yield f"lm_head.{kind}", self._read("token_embd.weight", as_blocks=self._is_tied_head_kept)

    def _read(self, name: str, as_blocks: bool | None = None) -> torch.Tensor:
        tensor = self.tensors[name]
        if as_blocks if as_blocks is not None else name in self._kept:
            block_bytes = AFFINE_TYPES[tensor.tensor_type.name][1]
            data = torch.from_numpy(np.array(tensor.data, dtype=np.uint8)).reshape(tensor.data.shape[0], -1,
                                                                                   block_bytes)
        else:
            data = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
        if self.architecture in _PERMUTED_QK and (".attn_q." in name or ".attn_k." in name):
            heads = self.raw_config["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]
            data = _unpermute_rows(data, heads)
        return data

    def _hf_name(self, name: str) -> str:
        kind = name.rsplit(".", 1)[1]
        return f"{self.modules[name]}.{'blocks' if name in self._kept else kind}"

    def _types(self, names) -> list[str]:
        return [self.tensors[name].tensor_type.name for name in names]

    def _linear_groups(self) -> list[tuple[str, ...]]:
        """The weight tensors of each linear layer the model builds, fused parts together."""
        groups = [(name,) for name in self.tensors if name.endswith(".weight") and self._is_linear(name)]
        fused = {name for parts in _FUSED for name in parts}
        groups = [group for group in groups if group[0].split(".")[-2] not in fused]
        for block in range(self.raw_config["num_hidden_layers"]):
            for parts in _FUSED:
                names = tuple(name for part in parts if (name := f"blk.{block}.{part}.weight") in self.tensors)
                groups += [names] if names else []
        return groups

    def _is_linear(self, name: str) -> bool:
        short = name.split(".")[-2]
        return short in _LAYER_MODULES and short not in _NORMS or short == "output"

    def _field(self, key: str, default=KeyError):
        field = self.reader.fields.get(key)
        if field is None:
            if default is KeyError:
                raise GgufError(f"{self.path.name} has no {key} in its metadata")
            return default
        return field.contents()

    def _config(self) -> dict:
        """config.json's fields, from the metadata; `quantization_config` when linear tensors are quantized."""
        arch = lambda key, default=KeyError: self._field(f"{self.architecture}.{key}", default)  # noqa: E731
        hidden, heads = int(arch("embedding_length")), int(arch("attention.head_count"))
        eos = [self._field(f"tokenizer.ggml.{key}_token_id", None) for key in ("eos", "eot")]
        config = {
            "model_type": ARCHITECTURES[self.architecture],
            "vocab_size": int(arch("vocab_size", None) or len(self._field("tokenizer.ggml.tokens"))),
            "hidden_size": hidden,
            "intermediate_size": int(arch("feed_forward_length")),
            "num_hidden_layers": int(arch("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(arch("attention.head_count_kv", heads)),
            "head_dim": int(arch("attention.key_length", hidden // heads)),
            "max_position_embeddings": int(arch("context_length")),
            "rms_norm_eps": float(arch("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(arch("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": list(dict.fromkeys(int(i) for i in eos if i is not None)),
        }
        scaling = arch("rope.scaling.type", "none")
        if scaling not in ("none", ""):
            config["rope_scaling"] = {"rope_type": scaling, "factor": float(arch("rope.scaling.factor")),
                                      "original_max_position_embeddings":
                                          int(arch("rope.scaling.original_context_length", config["max_position_embeddings"]))}
        quantization = self._quantization(config)
        return config if quantization is None else {**config, "quantization_config": quantization}

    def _quantization(self, config: dict) -> dict | None:
        """`quant_method` gguf with each linear module's (and the embedding's) tensor type; None when
        every linear tensor is float (then `--quantize` may quantize it at load like any float checkpoint)."""
        linear = {name: tensor.tensor_type.name for name, tensor in self.tensors.items()
                  if name.endswith(".weight") and self._is_linear(name)}
        embedding = self.tensors["token_embd.weight"].tensor_type.name
        if config["tie_word_embeddings"]:
            linear["output.weight"] = embedding
        if set(linear.values()) <= _FLOAT_TYPES:
            return None
        types = {self.modules.get(name, "lm_head"): kind for name, kind in linear.items()}
        types["model.embed_tokens"] = embedding
        common = Counter(linear.values()).most_common(1)[0][0]
        bits = AFFINE_TYPES[common][0] if common in AFFINE_TYPES else None
        file_type = self._field("general.file_type", None)
        return {"quant_method": "gguf", "bits": bits, "group_size": BLOCK_INPUTS if bits else None,
                "file_type": None if file_type is None else gguf.LlamaFileType(int(file_type)).name,
                "tensor_types": types}


def _module_name(name: str, architecture: str) -> str:
    """GGUF tensor name -> the Hugging Face module it fills ("blk.3.attn_q.bias" -> "model.layers.3.self_attn.q_proj")."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_MODULES:
        return f"model.layers.{parts[1]}.{_LAYER_MODULES[parts[2]]}"
    if len(parts) == 2 and parts[0] in _MODULES:
        return _MODULES[parts[0]]
    raise GgufError(f"GGUF tensor {name} has no place in tgserve's {architecture} model")


def _unpermute_rows(data: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: within each head, rows (pairs, halves) back to (halves, pairs)."""
    rows = data.shape[0]
    order = torch.arange(rows).reshape(num_heads, rows // num_heads // 2, 2).transpose(1, 2).reshape(-1)
    return data[order]


@functools.cache
def _is_readable(tensor_type: gguf.GGMLQuantizationType) -> bool:
    """Whether `gguf.quants.dequantize` turns this type into floats (tried on one zero block)."""
    block_inputs, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), tensor_type)
    except NotImplementedError:
        return False
    return True


def _gguf_version() -> str:
    from importlib.metadata import version
    return version("gguf")
