"""A draft model for `--speculative-model` cut from a checkpoint: its first decoder layers only.

Same tokenizer files, embeddings, final norm and head as the source, so it shares the target's
vocabulary; running a fraction of the layers, it costs a fraction of a forward and guesses the
target's next token often, not always (the trained demo model's first of 2 layers, SmolLM2's first 6
of 30). `tgserve demo-model DIR --draft-layers N` writes one; the speculation tests use it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file


def write_truncated_draft(source_dir: str | Path, out_dir: str | Path, num_layers: int) -> Path:
    """The checkpoint at `source_dir` with only its first `num_layers` decoder layers, into `out_dir`.

    Raises ValueError unless 1 <= num_layers < the source's layer count."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    config = json.loads((source_dir / "config.json").read_text())
    if not 1 <= num_layers < config["num_hidden_layers"]:
        raise ValueError(f"a draft keeps 1 to {config['num_hidden_layers'] - 1} of the source's "
                         f"{config['num_hidden_layers']} layers, not {num_layers}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in source_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in ("config.json",
                                                                                 "model.safetensors.index.json"):
            shutil.copy(path, out_dir / path.name)
    config["num_hidden_layers"] = num_layers
    for key in ("layer_types",):  # per-layer lists of transformers' config.json
        if key in config:
            config[key] = config[key][:num_layers]
    if "max_window_layers" in config:
        config["max_window_layers"] = min(config["max_window_layers"], num_layers)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    kept = {}
    for shard in sorted(source_dir.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < num_layers:
                kept[name] = tensor
    save_file(kept, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir
