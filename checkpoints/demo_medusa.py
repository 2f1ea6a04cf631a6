"""Briefly trained Medusa heads for the demo model, written as the Medusa checkpoint TGI loads.

`write_demo_medusa(out_dir, base_dir, base_model_id)` reads the frozen demo model's final hidden
states over the demo training stream, trains `num_heads` heads (one residual block each, as
FasterDecoding/Medusa's default) for a few CPU-seconds so that head i predicts the token i + 2 places
after each position, and writes `config.json` (`medusa_num_heads`, `medusa_num_layers`,
`base_model_name_or_path`) and `medusa_lm_head.safetensors` (`{i}.0.linear.weight|bias`, and
`{i}.1.weight`, each head's own lm_head, unless `shared_lm_head`: then the heads use the model's).
As Medusa initialises them: the blocks at zero (each head starts as the base model's next-token
guess), own lm_heads as copies of the model's. Deterministic for a seed, on one thread.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import Qwen2ForCausalLM

from tgserve.checkpoints.demo_model import _deterministic_torch, demo_training_ids
from tgserve.checkpoints.demo_tokenizer import build_demo_tokenizer, write_json
from tgserve.core.speculation.medusa_checkpoint import MEDUSA_HEADS_FILE

DEFAULT_NUM_HEADS = 3
NUM_LAYERS = 1  # residual blocks per head
WINDOW_TOKENS = 128  # the base model reads the stream in windows of this many tokens
NUM_TRAIN_STEPS = 150
BATCH_POSITIONS = 256
LEARNING_RATE = 3e-3
HEAD_DECAY = 0.8  # Medusa's loss weight per head: later heads guess further and matter less


def write_demo_medusa(out_dir: str | Path, base_dir: Path, base_model_id: str, num_heads: int = DEFAULT_NUM_HEADS,
                      *, shared_lm_head: bool = False, seed: int = 0, progress: bool = False) -> Path:
    """Train heads on the demo model at `base_dir` and write the Medusa checkpoint into `out_dir`.

    base_model_id: what config.json's `base_model_name_or_path` says (a --model-id that serves the
    same model as `base_dir`, e.g. `tgserve/demo-qwen2` or the folder's path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _deterministic_torch(seed, num_threads=1):
        model = Qwen2ForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
        hidden, targets = _hidden_and_targets(model, demo_training_ids(build_demo_tokenizer()), num_heads)
        lm_head = model.lm_head.weight.detach()
        tensors = _train(hidden, targets, lm_head, shared_lm_head, seed, progress)
    save_file(tensors, str(out_dir / MEDUSA_HEADS_FILE), metadata={"format": "pt"})
    write_json(out_dir / "config.json", {"base_model_name_or_path": base_model_id, "medusa_num_heads": num_heads,
                                         "medusa_num_layers": NUM_LAYERS})
    return out_dir


def _hidden_and_targets(model, ids: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Final normalized hidden states [positions, hidden] of the stream read window by window, and
    [positions, num_heads] targets: the token i + 2 places on, -100 past the window's end."""
    hidden, targets = [], []
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, WINDOW_TOKENS):
            window = ids[start:start + WINDOW_TOKENS]
            hidden.append(model.model(input_ids=window.unsqueeze(0)).last_hidden_state[0])
            ahead = torch.full((len(window), num_heads), -100, dtype=torch.long)
            for head in range(num_heads):
                ahead[:max(0, len(window) - head - 2), head] = window[head + 2:]
            targets.append(ahead)
    return torch.cat(hidden).clone(), torch.cat(targets)


def _train(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.Tensor, shared_lm_head: bool, seed: int,
           progress: bool) -> dict[str, torch.Tensor]:
    """Adam on random batches of positions; returns the heads' tensors under TGI's names."""
    num_heads, size = targets.shape[1], hidden.shape[1]
    weight = torch.zeros(num_heads, size, size, requires_grad=True)
    bias = torch.zeros(num_heads, size, requires_grad=True)
    out = lm_head.unsqueeze(0).repeat(num_heads, 1, 1).requires_grad_(not shared_lm_head)
    params = [weight, bias] + ([] if shared_lm_head else [out])
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    decay = HEAD_DECAY ** torch.arange(num_heads, dtype=torch.float32)
    for _ in tqdm(range(NUM_TRAIN_STEPS), desc="training Medusa heads", disable=not progress):
        rows = torch.randint(0, len(hidden), (BATCH_POSITIONS,), generator=generator)
        x = hidden[rows].unsqueeze(0).expand(num_heads, -1, -1)  # [heads, batch, hidden]
        x = x + torch.nn.functional.silu(torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)))
        logits = torch.bmm(x, out.transpose(1, 2))  # [heads, batch, vocab]
        losses = torch.stack([torch.nn.functional.cross_entropy(logits[head], targets[rows, head], ignore_index=-100)
                              for head in range(num_heads)])
        (losses * decay).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tensors = {}
    for head in range(num_heads):
        tensors[f"{head}.0.linear.weight"] = weight[head].detach().clone().contiguous()
        tensors[f"{head}.0.linear.bias"] = bias[head].detach().clone().contiguous()
        if not shared_lm_head:
            tensors[f"{head}.{NUM_LAYERS}.weight"] = out[head].detach().clone().contiguous()
    return tensors
