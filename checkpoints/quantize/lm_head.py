"""GPTQ on the output head (`tgserve quantize --method gptq --lm-head-bits 4|8`).

AutoGPTQ and GPTQModel leave lm_head float by default, and so does `tgserve quantize`. On a small model
the head is the largest matrix: Qwen2-0.5B's 151936 x 896 head is 272 MB of bfloat16 read per decoded
token, about 40% of a batch-1 step on a CPU (llama.cpp quantizes it, to Q6_K by default). Asked for, the
head is quantized like a decoder-layer linear: GPTQ with the Hessian of its own input, the final norm's
output over the calibration text (after the quantized layers, as served), the layers' group size,
symmetry and act-order, its own bits.

In the checkpoint (what GPTQModel writes for `lm_head=True`): lm_head.qweight / qzeros / scales / g_idx,
`"lm_head": true`, and where the head's bits differ from the layers' a `dynamic` rule
{"+:^lm_head$": {"bits": b, "group_size": g}} (GPTQModel's per-module override, read by tgserve's loader).
A tied model keeps model.embed_tokens.weight float for the input side and gets its head as separate
tensors, with `tie_word_embeddings: false`, so no loader ties the quantized head back to the embedding.
"""
from __future__ import annotations

from typing import Iterable

import torch

from tgserve.checkpoints.quantize.affine import QuantizedLinear, QuantSpec
from tgserve.checkpoints.quantize.gptq import HessianAccumulator, gptq_quantize

HEAD_PATTERN = "+:^lm_head$"  # GPTQModel's `dynamic` key: "+:" then a regex matched on the module name


def head_hessian(normed_hidden: Iterable[torch.Tensor], hidden_size: int) -> torch.Tensor:
    """H [hidden, hidden] of lm_head from its inputs, the final norm's outputs [..., hidden], batch by batch."""
    accumulator = HessianAccumulator(hidden_size)
    for hidden in normed_hidden:
        accumulator.add(hidden)
    return accumulator.hessian()


def quantize_head(model: torch.nn.Module, last_hidden: torch.Tensor, spec: QuantSpec) -> QuantizedLinear:
    """GPTQ of model.lm_head (transformers, float32) on the last decoder layer's outputs [batch, seq, hidden].

    `spec` is the layers' spec; the head uses spec.head_spec(). The model is left unchanged (a tied
    head shares the embedding, which stays float)."""
    head_spec = spec.head_spec()
    assert head_spec is not None, "quantize_head needs spec.lm_head_bits"
    norm = model.model.norm
    with torch.no_grad():
        normed = (norm(last_hidden[i:i + 1]) for i in range(last_hidden.shape[0]))
        hessian = head_hessian(normed, last_hidden.shape[-1])
    return gptq_quantize(model.lm_head.weight.data, hessian, head_spec)


def head_quantization_config(spec: QuantSpec) -> dict:
    """The `quantization_config` keys for the head: `lm_head`, and `dynamic` where its bits differ."""
    if spec.lm_head_bits is None:
        return {"lm_head": False}
    section: dict = {"lm_head": True}
    if spec.lm_head_bits != spec.bits:
        section["dynamic"] = {HEAD_PATTERN: {"bits": spec.lm_head_bits, "group_size": spec.group_size}}
    return section


def with_quantized_head(config: dict) -> dict:
    """config.json for a checkpoint holding lm_head's own (quantized) tensors: never tied to the embedding."""
    return {**config, "tie_word_embeddings": False}
