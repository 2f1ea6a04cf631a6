"""Checkpoint reading: a sharded checkpoint (index + several files) yields the same tensors as one file."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from tgserve.core.weights import iter_weights, safetensors_files


def test_sharded_checkpoint_reads_like_a_single_file(demo_model_dir, tmp_path):
    tensors = load_file(str(demo_model_dir / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(tmp_path / file))
        weight_map.update({n: file for n in shard_names})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert [f.name for f in safetensors_files(tmp_path)] == sorted(shards)
    read = dict(iter_weights(tmp_path))
    assert sorted(read) == names
    assert all(torch.equal(read[n], tensors[n]) for n in names)
