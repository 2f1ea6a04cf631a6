"""Briefly trained Medusa heads for the demo model, written as the Medusa checkpoint TGI loads.

`write_demo_medusa(out_dir, base_dir, base_model_id)` reads the frozen demo model's final hidden
states over the demo training stream and trains `num_heads` heads for a few CPU-seconds so that head
i predicts the token i + 2 places after each position (`medusa_training`: the heads, their loss and
their files; `shared_lm_head` writes heads that use the model's lm_head). Deterministic for a seed,
on one thread.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2ForCausalLM

from tgserve.checkpoints.demo_model import _deterministic_torch, demo_training_ids
from tgserve.checkpoints.demo_tokenizer import build_demo_tokenizer
from tgserve.checkpoints.medusa_training import (HeadTraining, ahead_targets, train_medusa_heads,
                                                 write_medusa_checkpoint)

DEFAULT_NUM_HEADS = 3
WINDOW_TOKENS = 128  # the base model reads the stream in windows of this many tokens
TRAINING = HeadTraining(num_steps=150, batch_positions=256, learning_rate=3e-3)


def write_demo_medusa(out_dir: str | Path, base_dir: Path, base_model_id: str, num_heads: int = DEFAULT_NUM_HEADS,
                      *, shared_lm_head: bool = False, seed: int = 0, progress: bool = False) -> Path:
    """Train heads on the demo model at `base_dir` and write the Medusa checkpoint into `out_dir`.

    base_model_id: what config.json's `base_model_name_or_path` says (a --model-id that serves the
    same model as `base_dir`, e.g. `tgserve/demo-qwen2` or the folder's path)."""
    with _deterministic_torch(seed, num_threads=1):
        model = Qwen2ForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
        hidden, targets = _hidden_and_targets(model, demo_training_ids(build_demo_tokenizer()), num_heads)
        tensors = train_medusa_heads(hidden, targets, model.lm_head.weight.detach(), TRAINING,
                                     shared_lm_head=shared_lm_head, seed=seed, progress=progress)
    return write_medusa_checkpoint(out_dir, tensors, base_model_id, num_heads)


def _hidden_and_targets(model, ids: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Final normalized hidden states [positions, hidden] of the stream read window by window, and
    [positions, num_heads] targets: the token i + 2 places on, IGNORE past the window's end."""
    hidden, targets = [], []
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, WINDOW_TOKENS):
            window = ids[start:start + WINDOW_TOKENS]
            hidden.append(model.model(input_ids=window.unsqueeze(0)).last_hidden_state[0])
            targets.append(ahead_targets(window, num_heads))
    return torch.cat(hidden).clone(), torch.cat(targets)
