"""Model classes by config `model_type`; a new family is one file plus one line here."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from tgserve.core.forward_batch import ForwardBatch
from tgserve.core.models.llama import LlamaForCausalLM
from tgserve.core.models.qwen2 import Qwen2ForCausalLM

class RunnableModel(Protocol):
    """What the engine needs of a model (`tgserve_make_model` returns one): the core's Qwen2 / Llama
    classes, or a backend's own (a compiled graph, a wrapped model)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill the parameters from (checkpoint name, tensor) pairs; called once, before any step."""

    def forward(self, batch: ForwardBatch, kv_cache) -> torch.Tensor:
        """Run the packed tokens of `batch` [T], writing their K/V into `kv_cache`; hidden states [T, hidden]."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab]; None on tensor-parallel ranks other than 0."""


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
