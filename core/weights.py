"""Reading a checkpoint's safetensors files (single file or sharded with an index), tensor by tensor."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files, in index order when sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def iter_weights(model_dir: Path, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint, on the CPU, in its stored dtype."""
    files = safetensors_files(model_dir)
    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
              desc="Loading weights", disable=not progress) as bar:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    yield name, tensor
                    bar.update(tensor.numel() * tensor.element_size())
