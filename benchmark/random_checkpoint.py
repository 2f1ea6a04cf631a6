"""A random-weight Qwen2 checkpoint of a released model's shape, drawn on the device that will run it.

`tgserve demo-model DIR --shape qwen2-7b` draws its 7.6 billion values on one CPU thread (torch's
seeded `randn` on the CPU does not run in parallel): measured here at 25-35 million values per
second, so several minutes for Qwen2-7B, more than a device lease can spare. This writer draws on
the GPU in seconds and writes the same files (config.json, the demo tokenizer, bf16 safetensors
shards of at most 2 GB with an index) except for the random values themselves, which a timing
benchmark does not care about as long as they are not zeros (zeros can run faster than real data).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from tgserve.checkpoints.demo_model import INIT_STD, MAX_SHARD_BYTES, plan_shards, qwen2_config, qwen2_tensor_shapes
from tgserve.checkpoints.demo_tokenizer import special_token_ids, write_json

WEIGHT_FILE_SUFFIXES = (".safetensors", ".safetensors.index.json")


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    """Everything of the demo checkpoint but its weights and config: tokenizer and generation config."""
    for path in Path(tokenizer_dir).iterdir():
        if path.is_file() and path.name != "config.json" and not path.name.endswith(WEIGHT_FILE_SUFFIXES):
            shutil.copy(path, out_dir / path.name)


def _draw(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Ones for norms, else N(0, INIT_STD^2) in bf16, on the generator's device; returned on the CPU."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    values = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return values.mul_(INIT_STD).to(torch.bfloat16).cpu()


def write_random_qwen2(out_dir: str | Path, dims: dict, tokenizer_dir: str | Path, device: str = "cpu",
                       seed: int = 0) -> Path:
    """Write a Qwen2ForCausalLM with `dims` (a value of `core.demo_model.SHAPES`, or smaller) into `out_dir`.

    tokenizer_dir: a demo checkpoint (`tgserve demo-model DIR`), whose tokenizer files are copied.
    device: where the values are drawn ("cuda" on a GPU machine); the files are the same either way
        except for the values. Returns `out_dir`.
    """
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer(tokenizer_dir, out_dir)
    token_ids = special_token_ids(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")))
    write_json(out_dir / "config.json", qwen2_config(dims, token_ids, dtype="bfloat16"))
    shapes = qwen2_tensor_shapes(dims)
    shards = plan_shards(shapes, MAX_SHARD_BYTES)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map = {}
    for file_name, shard in zip(names, shards):
        tensors = {name: _draw(name, shapes[name], generator) for name in shard}
        save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update((name, file_name) for name in shard)
        del tensors
    if len(shards) > 1:
        total_bytes = sum(math.prod(shape) * 2 for shape in shapes.values())
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out_dir
