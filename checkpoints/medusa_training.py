"""Medusa heads from a frozen model's final hidden states: targets, training, evaluation and TGI's layout.

Both Medusa writers call these: `demo_medusa` (the demo model reading its training stream) and
`smollm2_medusa` (SmolLM2 self-distilled on its own greedy answers). They differ only in where the
hidden states and tokens come from; the heads, their loss and their files are one definition here.

Head i learns the token i + 2 places after each position (the model's lm_head guesses the next one),
as FasterDecoding/Medusa trains it: one residual block `x + SiLU(W x + b)` per head, the blocks
initialised at zero (each head starts as the base model's next-token guess), own lm_heads as copies
of the model's, a cross-entropy per head weighted by `head_decay ** i` (later heads guess further
and matter less). Tensor names and config.json: `core/speculation/medusa_checkpoint.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from tgserve.checkpoints.demo_tokenizer import write_json
from tgserve.core.speculation.medusa_checkpoint import MEDUSA_HEADS_FILE
from tgserve.core.speculation.medusa_heads import MedusaHeads

NUM_LAYERS = 1  # residual blocks per head, FasterDecoding/Medusa's default
IGNORE = -100  # a target no head is trained on (past the text's end, or a position not sampled)
EVAL_ROWS = 256  # rows per chunk when scoring: [heads, rows, vocab] logits stay ~150 MB at vocab 49152


@dataclass(slots=True, frozen=True)
class HeadTraining:
    """How long and how hard the heads train (Adam on random batches of positions)."""

    num_steps: int  # optimizer steps
    batch_positions: int  # positions per step; each feeds every head
    learning_rate: float
    head_decay: float = 0.8  # head i's loss weight is head_decay ** i


def ahead_targets(ids: torch.Tensor, num_heads: int) -> torch.Tensor:
    """int64 [len(ids), num_heads]: column i holds the token i + 2 places after each position of
    `ids` ([tokens]), IGNORE where that falls past the end."""
    targets = torch.full((len(ids), num_heads), IGNORE, dtype=torch.long)
    for head in range(num_heads):
        targets[:max(0, len(ids) - head - 2), head] = ids[head + 2:]
    return targets


def train_medusa_heads(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.Tensor, training: HeadTraining,
                       *, shared_lm_head: bool, seed: int, softmax_over_targets: bool = False,
                       progress: bool = False) -> dict[str, torch.Tensor]:
    """The trained heads' tensors under TGI's names.

    hidden: float32 [positions, hidden_size], the frozen model's final normalized hidden states.
    targets: int64 [positions, num_heads] from `ahead_targets` (IGNORE where a head has nothing to learn).
    lm_head: float32 [vocab, hidden_size], the model's output projection (frozen; own lm_heads start as it).
    shared_lm_head: write no lm_head per head (TGI's MedusaHeadV2); only the blocks train.
    softmax_over_targets: the loss's softmax covers only the token ids that occur in `targets`, not
    the whole vocabulary (own lm_heads then train only those rows). On SmolLM2 (vocab 49,152; its
    answers use ~2,700 ids) a step costs ~6x less and the held-out accuracy, scored over the whole
    vocabulary, came out the same (0.122 against 0.129 for head 0 after 20 steps). It relies on the
    ids left out staying unlikely, as a trained model's rows for tokens its answers never use are;
    with a random lm_head they win the argmax and the heads score near zero.
    Deterministic for `seed` under torch's deterministic mode and a fixed thread count."""
    num_heads, size = targets.shape[1], hidden.shape[1]
    rows_out = lm_head
    if softmax_over_targets:  # renumber the targets into the kept ids' order
        kept = torch.unique(targets[targets != IGNORE])
        renumber = torch.full((lm_head.shape[0],), IGNORE, dtype=torch.long)
        renumber[kept] = torch.arange(len(kept))
        targets = torch.where(targets == IGNORE, targets, renumber[targets.clamp(min=0)])
        rows_out = lm_head[kept]
    weight = torch.zeros(num_heads, size, size, requires_grad=True)
    bias = torch.zeros(num_heads, size, requires_grad=True)
    out = rows_out.unsqueeze(0).repeat(num_heads, 1, 1).requires_grad_(not shared_lm_head)
    params = [weight, bias] + ([] if shared_lm_head else [out])
    optimizer = torch.optim.Adam(params, lr=training.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    decay = training.head_decay ** torch.arange(num_heads, dtype=torch.float32)
    for _ in tqdm(range(training.num_steps), desc="training Medusa heads", disable=not progress):
        rows = torch.randint(0, len(hidden), (training.batch_positions,), generator=generator)
        x = hidden[rows].unsqueeze(0).expand(num_heads, -1, -1)  # [heads, batch, hidden]
        x = x + torch.nn.functional.silu(torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)))
        logits = torch.bmm(x, out.transpose(1, 2))  # [heads, batch, vocab]
        losses = torch.stack([torch.nn.functional.cross_entropy(logits[head], targets[rows, head],
                                                                ignore_index=IGNORE) for head in range(num_heads)])
        (losses * decay).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tensors = {}
    for head in range(num_heads):
        tensors[f"{head}.0.linear.weight"] = weight[head].detach().clone().contiguous()
        tensors[f"{head}.0.linear.bias"] = bias[head].detach().clone().contiguous()
        if not shared_lm_head and not softmax_over_targets:
            tensors[f"{head}.{NUM_LAYERS}.weight"] = out[head].detach().clone().contiguous()
        elif not shared_lm_head:  # the trained rows into a copy of the model's lm_head
            tensors[f"{head}.{NUM_LAYERS}.weight"] = lm_head.clone().index_copy_(0, kept, out[head].detach())
    return tensors


def head_accuracies(tensors: dict[str, torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                    lm_head: torch.Tensor) -> list[float]:
    """Top-1 accuracy of each head over the positions where it has a target, computed by the serving
    code (`MedusaHeads.top_ids`), so the figure is what the server's guesses would score."""
    num_heads = targets.shape[1]
    out = None
    if f"0.{NUM_LAYERS}.weight" in tensors:
        out = torch.stack([tensors[f"{head}.{NUM_LAYERS}.weight"] for head in range(num_heads)])
    heads = MedusaHeads(torch.stack([tensors[f"{head}.0.linear.weight"] for head in range(num_heads)]).unsqueeze(1),
                        torch.stack([tensors[f"{head}.0.linear.bias"] for head in range(num_heads)]).unsqueeze(1),
                        out)
    with torch.inference_mode():
        guesses = torch.cat([heads.top_ids(hidden[start:start + EVAL_ROWS], lambda x: x @ lm_head.T)
                             for start in range(0, len(hidden), EVAL_ROWS)])
    scored = targets != IGNORE
    return [float((guesses[:, head] == targets[:, head])[scored[:, head]].float().mean())
            for head in range(num_heads)]


def write_medusa_checkpoint(out_dir: str | Path, tensors: dict[str, torch.Tensor], base_model_id: str,
                            num_heads: int) -> Path:
    """Write `medusa_lm_head.safetensors` and the config.json naming the heads' base model; return `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / MEDUSA_HEADS_FILE), metadata={"format": "pt"})
    (out_dir / MEDUSA_HEADS_FILE).chmod(0o644)  # save_file leaves it owner-only
    write_json(out_dir / "config.json", {"base_model_name_or_path": base_model_id, "medusa_num_heads": num_heads,
                                         "medusa_num_layers": NUM_LAYERS})
    return out_dir
