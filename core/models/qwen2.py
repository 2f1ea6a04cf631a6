"""Qwen2 / Qwen2.5: the Llama decoder with biases on the q, k and v projections.

The bias comes from `ModelConfig.attention_bias`, which is always true for model_type "qwen2", so the
shared decoder in `llama.py` runs Qwen2 checkpoints unchanged.
"""
from __future__ import annotations

from tgserve.core.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2ForCausalLM checkpoints (config model_type "qwen2")."""
