"""Medusa heads for SmolLM2-135M-Instruct, self-distilled on the model's own greedy chat answers.

As Medusa-2 and TGI's users train heads for a chat model: the frozen model answers varied prompts
(checkpoints/data/medusa_prompts.txt: questions, explanations, code, lists, rewrites; rendered with
its chat template) greedily, and the heads learn to predict those answers' tokens i + 2 places ahead
from the final hidden states. What the server verifies is exactly the model's greedy output, so no
corpus matches it better than the model's own answers (FasterDecoding/Medusa's "self-distillation").
The last prompts are held out: the heads are scored there, beside the trivial guess
"the token after the next one repeats the next one", and the figures are returned for the caller
to print. Generation (tgserve's engine) is most of the cost; all of it is deterministic for a seed
on a given machine and thread count.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tgserve.checkpoints.demo_model import _deterministic_torch
from tgserve.checkpoints.greedy_answers import greedy_answers
from tgserve.checkpoints.medusa_training import (HeadTraining, ahead_targets, head_accuracies,
                                                 train_medusa_heads, write_medusa_checkpoint)

PROMPTS_PATH = Path(__file__).parent / "data" / "medusa_prompts.txt"
PROMPT_SEPARATOR = "\n---\n"
DEFAULT_NUM_HEADS = 3
NUM_THREADS = 2  # torch threads for the forward and the training (the budget: 2 CPU cores)


@dataclass(slots=True, frozen=True)
class SelfDistillation:
    """How much text the model writes and how long the heads train on it."""

    num_prompts: int | None  # the file's first N prompts; None: all of them
    num_heldout_prompts: int  # the last N of those are never trained on; the heads are scored there
    max_new_tokens: int  # longest answer per prompt
    training: HeadTraining


# ~19,000 answer tokens to train on. Held-out head-0 accuracy then grew with steps (own lm_heads:
# 0.16 at 150, 0.21 at 300) while the training positions' went to 0.7: more answers would help most,
# and generating them is what costs.
DEFAULT_BUDGET = SelfDistillation(num_prompts=None, num_heldout_prompts=9, max_new_tokens=192,
                                  training=HeadTraining(num_steps=300, batch_positions=256, learning_rate=3e-3))
# The teacher-forced pass that reads the hidden states runs in bfloat16 (2-3x faster than float32
# in transformers on CPU); the heads train in float32 on them. bf16 is also what tgserve serves on
# CPUs with native bf16, so the heads learn from the hidden states they will read there.
FORWARD_DTYPE = torch.bfloat16


@dataclass(slots=True, frozen=True)
class SelfDistilledHeads:
    """The written checkpoint and how its heads score on the held-out answers."""

    path: Path  # the Medusa checkpoint folder
    num_train_positions: int  # answer positions the heads trained on
    num_heldout_positions: int  # answer positions scored
    heldout_accuracies: tuple[float, ...]  # [num_heads] top-1 accuracy of head i (token i + 2 ahead)
    repeat_last_accuracy: float  # how often the token two ahead equals the next one (the trivial guess)


def read_medusa_prompts(path: str | Path | None = None) -> list[str]:
    """The prompts: blocks separated by "---" lines, after the file's leading "#" header lines."""
    lines = Path(path or PROMPTS_PATH).read_text(encoding="utf-8").splitlines(keepends=True)
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        start += 1
    return [block.strip() for block in "".join(lines[start:]).split(PROMPT_SEPARATOR) if block.strip()]


def write_smollm2_medusa(out_dir: str | Path, base_dir: Path, base_model_id: str,
                         num_heads: int = DEFAULT_NUM_HEADS, *, shared_lm_head: bool = False, seed: int = 0,
                         budget: SelfDistillation | None = None, progress: bool = False) -> SelfDistilledHeads:
    """Self-distill heads for the SmolLM2 checkpoint at `base_dir`; write them into `out_dir`.

    base_model_id: config.json's `base_model_name_or_path` (an id that serves the model at `base_dir`).
    budget: DEFAULT_BUDGET when None (read at call time)."""
    budget = budget or DEFAULT_BUDGET
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    prompts = read_medusa_prompts()[:budget.num_prompts]
    if not 0 < budget.num_heldout_prompts < len(prompts):
        raise ValueError(f"{budget.num_heldout_prompts} held-out prompts of {len(prompts)}: both parts need some")
    prompt_ids = [_chat_ids(tokenizer, prompt) for prompt in prompts]
    answers = greedy_answers(base_dir, prompt_ids, budget.max_new_tokens, progress)
    with _deterministic_torch(seed, num_threads=NUM_THREADS):
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
        lm_head = model.get_output_embeddings().weight.detach().clone()  # float32; tied to the embedding
        model.to(FORWARD_DTYPE)
        num_train = len(prompts) - budget.num_heldout_prompts
        hidden, targets = answer_hidden_and_targets(model, prompt_ids[:num_train], answers[:num_train], num_heads)
        tensors = train_medusa_heads(hidden, targets, lm_head, budget.training, shared_lm_head=shared_lm_head,
                                     seed=seed, softmax_over_targets=True, progress=progress)
        held_hidden, held_targets = answer_hidden_and_targets(model, prompt_ids[num_train:], answers[num_train:],
                                                              num_heads)
        accuracies = head_accuracies(tensors, held_hidden, held_targets, lm_head)
    path = write_medusa_checkpoint(out_dir, tensors, base_model_id, num_heads)
    return SelfDistilledHeads(path, len(hidden), len(held_hidden), tuple(accuracies),
                              repeat_last_accuracy(prompt_ids[num_train:], answers[num_train:]))


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    """`prompt` as one user turn of the model's chat template, ready for the assistant's answer."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def answer_hidden_and_targets(model, prompt_ids: list[list[int]], answers: list[list[int]],
                              num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Final normalized hidden states (float32 [positions, hidden]) at the rows the server samples an answer
    from (the prompt's last token, then each answer token but the last), and [positions, num_heads]
    targets: the answer token i + 2 places on, IGNORE past the answer's end. One forward per
    prompt and answer, unpadded."""
    hidden, targets = [], []
    with torch.inference_mode():
        for prompt, answer in zip(prompt_ids, answers):
            ids = torch.tensor(prompt + answer)
            sampled = slice(len(prompt) - 1, len(ids) - 1)  # row p sampled token p + 1, an answer token
            hidden.append(model.model(input_ids=ids.unsqueeze(0)).last_hidden_state[0, sampled].float())
            targets.append(ahead_targets(ids, num_heads)[sampled])
    return torch.cat(hidden).clone(), torch.cat(targets)


def repeat_last_accuracy(prompt_ids: list[list[int]], answers: list[list[int]]) -> float:
    """Head 0's trivial rival: at each sampled row, guess that the token two ahead repeats the one just
    sampled; the fraction of answer positions where that is right."""
    num_right = num_scored = 0
    for prompt, answer in zip(prompt_ids, answers):
        ids = prompt + answer
        for row in range(len(prompt) - 1, len(ids) - 2):
            num_right += ids[row + 2] == ids[row + 1]
            num_scored += 1
    return num_right / max(1, num_scored)

