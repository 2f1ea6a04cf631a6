"""Reading TGI's Medusa layout: which folders are Medusa checkpoints, `--speculate` against the head
count, and the heads' guesses against an independent reading of `medusa_lm_head.safetensors`.

Oracle for the heads: the tensors read back with safetensors' own loader and applied one head and
one row at a time as FasterDecoding/Medusa defines a head (`x + SiLU(W x + b)` per block, then the
head's lm_head, or the model's where the file has none), in float64."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tgserve.core.config import ConfigError
from tgserve.core.speculation import MedusaProposer, NgramProposer, make_proposer
from tgserve.core.speculation.medusa_checkpoint import MEDUSA_HEADS_FILE, find_medusa, read_medusa
from tgserve.core.speculation.medusa_heads import MedusaHeads

HIDDEN, VOCAB = 16, 40


def write_heads(path, num_heads: int, num_layers: int, own_lm_head: bool, seed: int = 0) -> None:
    """Random heads under TGI's tensor names, and the config.json that names them."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for head in range(num_heads):
        for layer in range(num_layers):
            tensors[f"{head}.{layer}.linear.weight"] = torch.randn(HIDDEN, HIDDEN, generator=generator) / 4
            tensors[f"{head}.{layer}.linear.bias"] = torch.randn(HIDDEN, generator=generator) / 4
        if own_lm_head:
            tensors[f"{head}.{num_layers}.weight"] = torch.randn(VOCAB, HIDDEN, generator=generator)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / MEDUSA_HEADS_FILE))
    (path / "config.json").write_text(json.dumps({"medusa_num_heads": num_heads, "medusa_num_layers": num_layers,
                                                  "base_model_name_or_path": "org/base-model"}))


def reference_guesses(path, num_heads: int, num_layers: int, hidden: torch.Tensor, lm_head: torch.Tensor):
    """[rows][heads] top-1 ids, row by row and head by head from the file's tensors."""
    tensors = {name: t.double() for name, t in load_file(str(path / MEDUSA_HEADS_FILE)).items()}
    guesses = []
    for h in hidden.double():
        row = []
        for head in range(num_heads):
            x = h
            for layer in range(num_layers):
                x = x + torch.nn.functional.silu(tensors[f"{head}.{layer}.linear.weight"] @ x
                                                 + tensors[f"{head}.{layer}.linear.bias"])
            out = tensors.get(f"{head}.{num_layers}.weight", lm_head.double())
            row.append(int((out @ x).argmax()))
        guesses.append(row)
    return guesses


@pytest.mark.parametrize("own_lm_head", [True, False], ids=["own-lm-head", "shared-lm-head"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_heads_guess_as_the_file_defines(tmp_path, own_lm_head, num_layers):
    write_heads(tmp_path, 4, num_layers, own_lm_head)
    checkpoint = read_medusa(tmp_path)
    assert (checkpoint.num_heads, checkpoint.num_layers, checkpoint.base_model_id) == (4, num_layers, "org/base-model")
    hidden = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(1))
    lm_head = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(2)).double()
    calls = []

    def compute_logits(rows):
        calls.append(rows.shape)
        return rows @ lm_head.T

    expected = reference_guesses(tmp_path, 4, num_layers, hidden, lm_head)
    heads = MedusaHeads.load(checkpoint, 4, torch.float64, torch.device("cpu"))
    assert (heads.out_weights is None) == (not own_lm_head)
    assert heads.top_ids(hidden.double(), compute_logits).tolist() == expected
    assert calls == ([] if own_lm_head else [(4 * 7, HIDDEN)])  # one lm_head call for every head's rows
    # As TGI, only the heads --speculate uses are loaded: the first N.
    first_two = MedusaHeads.load(checkpoint, 2, torch.float64, torch.device("cpu"))
    assert first_two.top_ids(hidden.double(), compute_logits).tolist() == [row[:2] for row in expected]


def test_a_missing_tensor_is_named(tmp_path):
    write_heads(tmp_path, 2, 1, own_lm_head=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "medusa_num_heads": 3}))
    with pytest.raises(ConfigError, match="no tensor '2.0.linear.weight'"):
        MedusaHeads.load(read_medusa(tmp_path), 3, torch.float32, torch.device("cpu"))


def test_which_folders_are_medusa_checkpoints(tmp_path):
    assert find_medusa(tmp_path, {"model_type": "qwen2"}) is None
    assert read_medusa(tmp_path) is None  # no config.json
    with pytest.raises(ConfigError, match="no base_model_name_or_path"):
        find_medusa(tmp_path, {"medusa_num_heads": 2})
    with pytest.raises(ConfigError, match=f"without {MEDUSA_HEADS_FILE}"):
        find_medusa(tmp_path, {"medusa_num_heads": 2, "base_model_name_or_path": "org/base"})
    write_heads(tmp_path, 2, 1, own_lm_head=True)
    assert find_medusa(tmp_path, {"medusa_num_heads": 2, "base_model_name_or_path": "org/base"}).base_model_id == "org/base"
    # A relative name that is a checkpoint folder inside the Medusa folder resolves there.
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    found = find_medusa(tmp_path, {"medusa_num_heads": 2, "base_model_name_or_path": "base"})
    assert found.base_model_id == str(tmp_path / "base")


def test_speculate_defaults_to_the_head_count_and_may_not_exceed_it(tmp_path):
    write_heads(tmp_path, 3, 1, own_lm_head=True)
    checkpoint = read_medusa(tmp_path)
    assert [checkpoint.speculate(n) for n in (None, 0, 1, 3)] == [3, 0, 1, 3]
    with pytest.raises(ConfigError) as error:
        checkpoint.speculate(4)
    assert str(error.value) == "Speculate is set to `4` but this medusa models only has `3` heads, please make them match"
    assert isinstance(make_proposer(2, medusa=checkpoint), MedusaProposer)
    assert make_proposer(2, medusa=checkpoint).method == "medusa"
    assert isinstance(make_proposer(2), NgramProposer)
    assert make_proposer(0, medusa=checkpoint) is None


@pytest.mark.parametrize("own_lm_head", [True, False], ids=["own-lm-head", "shared-lm-head"])
def test_heads_that_do_not_fit_the_model_are_refused(tmp_path, own_lm_head):
    write_heads(tmp_path, 2, 1, own_lm_head)
    checkpoint = read_medusa(tmp_path)
    MedusaHeads.load(checkpoint, 2, torch.float32, torch.device("cpu"), (HIDDEN, VOCAB))
    with pytest.raises(ConfigError, match="do not fit the base model org/base-model"):
        MedusaHeads.load(checkpoint, 2, torch.float32, torch.device("cpu"), (HIDDEN * 2, VOCAB))
    if own_lm_head:
        with pytest.raises(ConfigError, match=r"lm_heads \(40, 16\)"):
            MedusaHeads.load(checkpoint, 2, torch.float32, torch.device("cpu"), (HIDDEN, VOCAB + 1))
    else:  # the model's own lm_head serves any vocabulary
        MedusaHeads.load(checkpoint, 2, torch.float32, torch.device("cpu"), (HIDDEN, VOCAB + 1))
