"""The parts of a checkpoint's config.json that the engine needs, read once into a dataclass."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """Architecture of a decoder-only checkpoint (Qwen2 / Llama family)."""

    model_type: str  # registry key: "qwen2", "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    # rope_type and its parameters, None for plain RoPE; "original_max_position_embeddings" is always
    # there for yarn, dynamic and llama3 (for dynamic it is max_position_embeddings, as transformers uses).
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (always for Qwen2)
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    # The longest sequence the server computes when that passes max_position_embeddings (its
    # --max-total-tokens); set by `tgserve.core.rope_scaling.serving_model_config`, None from a checkpoint.
    max_sequence_tokens: int | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        heads = raw["num_attention_heads"]
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        max_positions = raw.get("max_position_embeddings", 4096)
        rope_scaling = normalize_rope_scaling(rope, max_positions, raw.get("original_max_position_embeddings"))
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        model_type = raw["model_type"]
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            max_position_embeddings=max_positions,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=model_type == "qwen2" or raw.get("attention_bias", False),
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        return cls.from_dict(json.loads((Path(model_dir) / "config.json").read_text()))

    @property
    def num_rope_positions(self) -> int:
        """Positions the rotary tables cover: max_position_embeddings, or the served length beyond it."""
        return max(self.max_position_embeddings, self.max_sequence_tokens or 0)

    @property
    def max_context_tokens(self) -> int | None:
        """The longest sequence this model's positions support; None when dynamic NTK stretches to any length.

        Plain RoPE: `max_position_embeddings`. linear: `factor` times that. yarn and llama3: `factor`
        times the original window, or `max_position_embeddings` when the config states more.
        """
        scaling = self.rope_scaling
        if scaling is None:
            return self.max_position_embeddings
        if scaling["rope_type"] == "dynamic":
            return None
        if scaling["rope_type"] == "linear":
            return int(self.max_position_embeddings * float(scaling["factor"]))
        return max(self.max_position_embeddings,
                   int(float(scaling["factor"]) * scaling["original_max_position_embeddings"]))


def normalize_rope_scaling(rope: dict, max_position_embeddings: int, original_max_position_embeddings: int | None
                           ) -> dict | None:
    """The rope dict with `rope_type` set (old configs say `type`) and the window the type measures from.

    None for plain RoPE. yarn and llama3 without `original_max_position_embeddings` take the config's
    top-level one (Phi-3 style) or `max_position_embeddings`, and a yarn without `factor` takes their
    ratio, as transformers standardises them; dynamic NTK always measures from `max_position_embeddings`.
    """
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    rope = {**rope, "rope_type": rope_type}
    if rope_type == "dynamic":
        rope["original_max_position_embeddings"] = max_position_embeddings
    elif rope_type in ("yarn", "llama3") and original_max_position_embeddings is not None:
        rope["original_max_position_embeddings"] = original_max_position_embeddings
    elif rope_type in ("yarn", "llama3"):
        rope.setdefault("original_max_position_embeddings", max_position_embeddings)
    if rope_type == "yarn" and rope.get("factor") is None:
        rope["factor"] = max_position_embeddings / rope["original_max_position_embeddings"]
    return rope
