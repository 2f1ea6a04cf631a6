"""Small GGUF files written in the tests with the `gguf` package's own writer and quantizers (test helper)."""
from __future__ import annotations

import zlib
from pathlib import Path

import gguf
import numpy as np


def _byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 characters its BPE writes bytes as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e"]
TOKENS = SPECIAL_TOKENS + _byte_tokens() + ["Ġt", "he"]  # 261 tokens


def write_gguf(path: Path, architecture: str, metadata: dict, tensors: dict[str, tuple[np.ndarray, str]],
               with_tokenizer: bool = False) -> Path:
    """A GGUF file at `path`: `metadata` keys (int: uint32, float: float32, str: string) besides
    general.architecture; `tensors` name -> (float weights [out, in] or [n], GGUF type name), quantized by
    `gguf.quants.quantize` (an int32 array with type "I32" is written as is; K-quants, which `gguf`
    cannot quantize, are random blocks of the weights' shape, see `random_k_quant`); `with_tokenizer`: a
    byte-level BPE tokenizer of `len(TOKENS)` tokens (eos 2) in llama.cpp's gpt2 tokenizer keys."""
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)
    if with_tokenizer:
        writer.add_string("tokenizer.ggml.model", "gpt2")
        writer.add_array("tokenizer.ggml.tokens", TOKENS)
        writer.add_array("tokenizer.ggml.token_type", [3] * len(SPECIAL_TOKENS) + [1] * (len(TOKENS) - len(SPECIAL_TOKENS)))
        writer.add_array("tokenizer.ggml.merges", MERGES)
        writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
        writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    for name, (weights, kind) in tensors.items():
        if kind == "I32":
            writer.add_tensor(name, weights.astype(np.int32))
        elif kind in ("F32", "F16"):
            writer.add_tensor(name, weights.astype(np.float32 if kind == "F32" else np.float16))
        elif kind in K_QUANT_SCALE_BYTES:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, random_k_quant(weights.shape, kind, zlib.crc32(name.encode())), raw_dtype=qtype)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(weights.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def model_metadata(architecture: str, hidden: int, heads: int, kv_heads: int, ffn: int, layers: int,
                   vocab: int) -> dict:
    """The hyperparameter keys llama.cpp writes for a llama / qwen2 model."""
    return {f"{architecture}.{key}": value for key, value in {
        "context_length": 2048, "embedding_length": hidden, "block_count": layers, "feed_forward_length": ffn,
        "rope.dimension_count": hidden // heads, "attention.head_count": heads, "attention.head_count_kv": kv_heads,
        "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0, "vocab_size": vocab}.items()}


# K-quant type -> (byte offset of its float16 super-block scale(s) d (and dmin), value written there)
K_QUANT_SCALE_BYTES = {"Q4_K": (0, 2, 2e-4), "Q6_K": (208, 1, 3e-5)}


def random_k_quant(shape: tuple[int, int], kind: str, seed: int) -> np.ndarray:
    """Random codes and sub-block scales of a K-quant tensor [out, in] (in a multiple of 256), raw bytes
    [out, in / 256 * block bytes], with small fixed float16 super-block scales so values stay O(0.1)."""
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[kind]
    block_inputs, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (shape[0], shape[1] // block_inputs, block_bytes), dtype=np.uint8)
    offset, count, value = K_QUANT_SCALE_BYTES[kind]
    blocks[..., offset:offset + 2 * count] = np.full(count, value, dtype=np.float16).view(np.uint8)
    return blocks.reshape(shape[0], -1)
