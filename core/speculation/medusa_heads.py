"""Medusa heads on the device: each sampled row's hidden state -> every head's top-1 guess, in a few batched ops.

The heads run in the same step as the target model, on the hidden states of the rows the runner
samples (`ModelRunner.execute`), and their guesses ride the step's one host read. All heads compute
at once: their residual blocks as one batched matmul per block over [num_heads, rows, hidden], their
lm_heads as one more ([num_heads, rows, vocab]); heads that share the model's lm_head call the
model's `compute_logits` once on every head's rows. Layout and meaning: `medusa_checkpoint`.
"""
from __future__ import annotations

from typing import Callable

import torch
from safetensors import safe_open

from tgserve.core.config import ConfigError
from tgserve.core.speculation.medusa_checkpoint import MedusaCheckpoint


class MedusaHeads:
    """The first `num_heads` heads of a Medusa checkpoint, stacked per kind of tensor."""

    def __init__(self, block_weights: torch.Tensor, block_biases: torch.Tensor, out_weights: torch.Tensor | None):
        self.block_weights = block_weights  # [num_heads, num_layers, hidden, hidden]: Linear weights (out, in)
        self.block_biases = block_biases  # [num_heads, num_layers, hidden]
        self.out_weights = out_weights  # [num_heads, vocab, hidden], or None: the heads share the model's lm_head

    @property
    def num_heads(self) -> int:
        return self.block_weights.shape[0]

    @classmethod
    def load(cls, checkpoint: MedusaCheckpoint, num_heads: int, dtype: torch.dtype, device: torch.device,
             model_shape: tuple[int, int] | None = None) -> "MedusaHeads":
        """Read heads 0 .. num_heads - 1 (as TGI, only the heads `--speculate` uses) onto `device` as `dtype`.

        model_shape: the served model's (hidden_size, vocab_size), checked against the heads' tensors.
        Raises ConfigError naming the first tensor the file lacks, or a shape that does not fit."""
        num_layers = checkpoint.num_layers
        with safe_open(str(checkpoint.heads_file), framework="pt") as handle:
            names = set(handle.keys())

            def read(name: str) -> torch.Tensor:
                if name not in names:
                    raise ConfigError(f"{checkpoint.heads_file} has no tensor {name!r} (medusa_num_layers="
                                      f"{num_layers}, {num_heads} heads used)")
                return handle.get_tensor(name).to(device=device, dtype=dtype)

            def stacked(name: str) -> torch.Tensor:  # [num_heads, num_layers, ...]
                return torch.stack([torch.stack([read(name.format(head=head, layer=layer))
                                                 for layer in range(num_layers)]) for head in range(num_heads)])

            weights, biases = stacked("{head}.{layer}.linear.weight"), stacked("{head}.{layer}.linear.bias")
            out = None
            if f"0.{num_layers}.weight" in names:  # each head has its own lm_head (else: TGI's MedusaHeadV2)
                out = torch.stack([read(f"{head}.{num_layers}.weight") for head in range(num_heads)])
        heads = cls(weights, biases, out)
        if model_shape is not None:
            heads._check_fits(model_shape, checkpoint)
        return heads

    def _check_fits(self, model_shape: tuple[int, int], checkpoint: MedusaCheckpoint) -> None:
        """Raise ConfigError unless the blocks read the model's hidden size and own lm_heads its vocabulary."""
        hidden_size, vocab_size = model_shape
        block_shape = tuple(self.block_weights.shape[2:])
        out_shape = None if self.out_weights is None else tuple(self.out_weights.shape[1:])
        if block_shape != (hidden_size, hidden_size) or out_shape not in (None, (vocab_size, hidden_size)):
            raise ConfigError(f"the Medusa heads in {checkpoint.heads_file} (blocks {block_shape}, lm_heads "
                              f"{out_shape or 'shared'}) do not fit the base model {checkpoint.base_model_id} "
                              f"(hidden size {hidden_size}, vocabulary {vocab_size})")

    def top_ids(self, hidden: torch.Tensor, compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """int64 [rows, num_heads]: head i's most likely token i + 2 places after each row of `hidden`
        ([rows, hidden], the final normalized hidden states); `compute_logits`: the model's lm_head."""
        num_rows = hidden.shape[0]
        x = hidden.to(self.block_weights.dtype).unsqueeze(0).expand(self.num_heads, num_rows, -1)
        for layer in range(self.block_weights.shape[1]):
            linear = torch.baddbmm(self.block_biases[:, layer].unsqueeze(1), x,
                                   self.block_weights[:, layer].transpose(1, 2))
            x = x + torch.nn.functional.silu(linear)
        if self.out_weights is not None:
            logits = torch.bmm(x, self.out_weights.transpose(1, 2))  # [num_heads, rows, vocab]
        else:
            logits = compute_logits(x.reshape(self.num_heads * num_rows, -1).to(hidden.dtype))
            logits = logits.reshape(self.num_heads, num_rows, -1)
        return logits.argmax(dim=-1).t()
