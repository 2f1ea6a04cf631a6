"""Model classes by config `model_type`; a new family is one file plus one line here."""
from __future__ import annotations

from tgserve.core.models.llama import LlamaForCausalLM
from tgserve.core.models.qwen2 import Qwen2ForCausalLM

MODELS = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
}


def model_class(model_type: str):
    """The class serving `model_type`; raises ValueError naming the supported ones."""
    try:
        return MODELS[model_type]
    except KeyError:
        raise ValueError(f"Unsupported model type {model_type} (supported: {', '.join(sorted(MODELS))})") from None
