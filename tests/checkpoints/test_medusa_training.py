"""The shared Medusa training code on small tensors: targets, training that learns, scoring as served.

Oracles: targets written out by hand; `reference_guesses` (tests/core/speculation/
test_medusa_checkpoint.py), which applies a written checkpoint's heads row by row in float64 as
FasterDecoding/Medusa defines them, for the accuracies; a task whose answer is known for training.
"""
from __future__ import annotations

import json

import pytest
import torch

from tgserve.checkpoints.medusa_training import (IGNORE, HeadTraining, ahead_targets, head_accuracies,
                                                 train_medusa_heads, write_medusa_checkpoint)
from tgserve.core.speculation.medusa_checkpoint import read_medusa

from ..core.speculation.test_medusa_checkpoint import reference_guesses

HIDDEN, VOCAB, NUM_HEADS = 16, 50, 2


def test_ahead_targets_are_the_tokens_two_and_more_places_on():
    assert ahead_targets(torch.tensor([5, 6, 7, 8]), 2).tolist() == [[7, 8], [8, IGNORE], [IGNORE, IGNORE],
                                                                     [IGNORE, IGNORE]]


def learnable_task(num_positions: int, seed: int):
    """Hidden states around 4 fixed centers (positions drawn with `seed`); head i's target is a fixed
    token per center and head (ids below 8), which the untrained heads (the lm_head's guess) miss.
    The other ids' lm_head rows are short, as a trained model's rows for tokens it never writes in
    such text: the softmax over the target ids alone relies on it (`train_medusa_heads`)."""
    fixed = torch.Generator().manual_seed(0)
    centers = torch.randn(4, HIDDEN, generator=fixed) * 2
    lm_head = torch.randn(VOCAB, HIDDEN, generator=fixed) / 4
    lm_head[8:] /= 100
    generator = torch.Generator().manual_seed(seed)
    cluster = torch.randint(0, 4, (num_positions,), generator=generator)
    hidden = centers[cluster] + 0.1 * torch.randn(num_positions, HIDDEN, generator=generator)
    targets = torch.stack([(cluster + 3 * head) % 8 for head in range(NUM_HEADS)], dim=1)
    targets[::7, 1] = IGNORE  # positions where a head has nothing to learn are skipped
    return hidden, targets, lm_head


@pytest.mark.parametrize("shared_lm_head", [False, True], ids=["own-lm-head", "shared-lm-head"])
@pytest.mark.parametrize("softmax_over_targets", [False, True], ids=["full-softmax", "target-softmax"])
def test_training_learns_and_scores_as_the_file_serves(tmp_path, shared_lm_head, softmax_over_targets):
    hidden, targets, lm_head = learnable_task(512, seed=0)
    training = HeadTraining(num_steps=80, batch_positions=64, learning_rate=3e-2)
    tensors = train_medusa_heads(hidden, targets, lm_head, training, shared_lm_head=shared_lm_head, seed=0,
                                 softmax_over_targets=softmax_over_targets)
    assert tensors["0.0.linear.weight"].shape == (HIDDEN, HIDDEN)
    assert ("0.1.weight" in tensors) == (not shared_lm_head)
    if not shared_lm_head and softmax_over_targets:  # ids no target uses keep the model's lm_head rows
        assert torch.equal(tensors["1.1.weight"][8:], lm_head[8:])
        assert not torch.equal(tensors["1.1.weight"][:8], lm_head[:8])
    held_hidden, held_targets, _ = learnable_task(256, seed=1)  # new positions
    accuracies = head_accuracies(tensors, held_hidden, held_targets, lm_head)
    assert min(accuracies) > 0.9, accuracies
    untrained = {name: torch.zeros_like(t) for name, t in tensors.items() if "linear" in name}
    assert max(head_accuracies(untrained, held_hidden, held_targets, lm_head)) < 0.5

    path = write_medusa_checkpoint(tmp_path, tensors, "org/base", NUM_HEADS)
    assert json.loads((path / "config.json").read_text()) == {"base_model_name_or_path": "org/base",
                                                              "medusa_num_heads": NUM_HEADS, "medusa_num_layers": 1}
    assert read_medusa(path).num_heads == NUM_HEADS
    guesses = torch.tensor(reference_guesses(path, NUM_HEADS, 1, held_hidden, lm_head))
    scored = held_targets != IGNORE
    expected = [float((guesses[:, h] == held_targets[:, h])[scored[:, h]].float().mean()) for h in range(NUM_HEADS)]
    assert accuracies == pytest.approx(expected, abs=1e-6)


def test_training_is_deterministic_for_a_seed():
    hidden, targets, lm_head = learnable_task(256, seed=2)
    training = HeadTraining(num_steps=5, batch_positions=32, learning_rate=1e-2)
    runs = [train_medusa_heads(hidden, targets, lm_head, training, shared_lm_head=False, seed=seed,
                               softmax_over_targets=True) for seed in (3, 3, 4)]
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])
    assert not torch.equal(runs[0]["0.0.linear.weight"], runs[2]["0.0.linear.weight"])
