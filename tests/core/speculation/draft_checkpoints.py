"""Draft checkpoints for the speculation tests, made from the demo checkpoint (test helper).

`write_truncated_draft`: the demo model's first layers only (same tokenizer, same embeddings and
head): a cheaper model whose guesses are often, not always, the target's, so verification both
accepts and rejects. `write_relabelled_tokenizer`: the demo checkpoint with two tokens' ids swapped
in its tokenizer, the same vocabulary size: a draft whose ids mean other tokens.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file


def write_truncated_draft(target_dir: Path, out_dir: Path, num_layers: int) -> Path:
    """The checkpoint at `target_dir` with only its first `num_layers` decoder layers, into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in target_dir.iterdir():
        if path.suffix != ".safetensors" and path.name != "config.json" and path.is_file():
            shutil.copy(path, out_dir / path.name)
    config = json.loads((target_dir / "config.json").read_text())
    assert num_layers < config["num_hidden_layers"]
    config["num_hidden_layers"] = num_layers
    for key in ("layer_types",):
        if key in config:
            config[key] = config[key][:num_layers]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    kept = {}
    for shard in sorted(target_dir.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < num_layers:
                kept[name] = tensor
    save_file(kept, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def write_relabelled_tokenizer(target_dir: Path, out_dir: Path) -> tuple[str, str]:
    """A copy of `target_dir` whose tokenizer swaps the ids of two ordinary tokens; returns the two tokens."""
    shutil.copytree(target_dir, out_dir)
    path = out_dir / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(tokenizer))
    return first, second
