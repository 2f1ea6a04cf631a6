"""Tests for the offline demo checkpoint and the random real-shape Qwen2 checkpoints."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from tgserve.checkpoints import demo_model
from tgserve.checkpoints.demo_model import (
    SHAPES,
    ensure_demo_model,
    plan_shards,
    qwen2_config,
    qwen2_tensor_shapes,
    write_demo_model,
    write_random_qwen2_weights,
)
from tgserve.checkpoints.demo_tokenizer import build_demo_tokenizer, read_demo_corpus, special_token_ids, write_json

TRICKY_TEXTS = [
    "Hello, world!",
    "The lighthouse stands on a rock at the end of the long grey pier.",
    "I'm sure they'll say it's 2024-05-17; pi is 3.14159, not 22/7!",
    "line one\n\nline two\r\n    indented\ttab   trailing  ",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "emoji 😀🌧️🍞🐝 and a family 👩‍👩‍👧 and flags 🇫🇷",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "Café naïve résumé jalapeño",
    "   leading spaces and CAPITALS AND 12345678901234567890",
    "",
]


def test_shapes_have_released_qwen2_dimensions():
    common = dict(max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
    assert SHAPES == {
        "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                           intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, **common),
        "qwen2-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                           intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, **common),
        "qwen2-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, **common),
    }


def test_build_is_deterministic(tmp_path, monkeypatch):
    # Determinism does not depend on how long we train, so train a few steps only.
    monkeypatch.setattr(demo_model, "NUM_TRAIN_STEPS", 3)
    first = write_demo_model(tmp_path / "a", seed=0)
    second = write_demo_model(tmp_path / "b", seed=0)
    other_seed = write_demo_model(tmp_path / "c", seed=1)
    for name in ["tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other_seed / "model.safetensors").read_bytes()


def test_training_restores_torch_state(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_model, "NUM_TRAIN_STEPS", 1)
    num_threads = torch.get_num_threads()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    write_demo_model(tmp_path, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == num_threads
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_autotokenizer_matches_tokenizers(demo_model_dir, text):
    raw = Tokenizer.from_file(str(demo_model_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(demo_model_dir)
    ids = raw.encode(text).ids
    assert hf(text)["input_ids"] == ids
    assert raw.decode(ids, skip_special_tokens=False) == hf.decode(ids) == text


def test_tokenizer_special_tokens(demo_model_dir):
    hf = AutoTokenizer.from_pretrained(demo_model_dir)
    endoftext, im_start, im_end = hf.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert (im_start, im_end) == (endoftext + 1, endoftext + 2) and im_end == len(hf) - 1
    assert (hf.eos_token, hf.pad_token, hf.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    generation = json.loads((demo_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [im_end, endoftext] and generation["do_sample"] is False
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["vocab_size"] >= len(hf) and config["vocab_size"] % 128 == 0
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["dtype"] == "float32" and config["rope_parameters"]["rope_theta"] == 10000.0


def test_chat_template_renders_chatml(demo_model_dir):
    hf = AutoTokenizer.from_pretrained(demo_model_dir)
    template_file = (demo_model_dir / "chat_template.jinja").read_text()
    assert json.loads((demo_model_dir / "tokenizer_config.json").read_text())["chat_template"] == template_file
    text = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def demo_lm(demo_model_dir):
    """(tokenizer, model) for the demo checkpoint, loaded by transformers."""
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    return tokenizer, model


def _greedy(demo_lm, input_ids: list[int], max_new_tokens: int) -> list[int]:
    tokenizer, model = demo_lm
    prompt = torch.tensor([input_ids])
    with torch.no_grad():
        output = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("prompt", [
    "The lighthouse stands on a rock",
    "Bread is made from four simple things:",
    "The solar system is the sun",
    "In winter the storms",
])
def test_greedy_continues_corpus(demo_lm, prompt):
    tokenizer, _ = demo_lm
    corpus = read_demo_corpus()
    expected_words = corpus[corpus.index(prompt) + len(prompt):].split()[:5]
    continuation = tokenizer.decode(_greedy(demo_lm, tokenizer(prompt)["input_ids"], 16))
    assert continuation.split()[:5] == expected_words


def test_chat_answer_stops_at_im_end(demo_lm):
    tokenizer, _ = demo_lm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    answer = tokenizer.decode(_greedy(demo_lm, prompt_ids, 24))
    assert answer.startswith("The capital of France is Paris.<|im_end|>")


def test_qwen2_0_5b_shape_loads_with_transformers(tmp_path):
    out_dir = write_demo_model(tmp_path, "qwen2-0.5b")
    assert (out_dir / "model.safetensors").exists()
    assert not (out_dir / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2-0.5B, tied lm_head
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.rope_parameters["rope_theta"] == 1000000.0
    layer = model.model.layers[0]
    assert layer.self_attn.k_proj.weight.shape == (128, 896)
    assert torch.all(layer.input_layernorm.weight == 1)
    assert 0.018 < layer.mlp.up_proj.weight.float().std().item() < 0.022


def test_sharded_random_weights_load_with_transformers(tmp_path):
    dims = dict(SHAPES["qwen2-7b"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, vocab_size=2048)
    token_ids = special_token_ids(build_demo_tokenizer())
    write_json(tmp_path / "config.json", qwen2_config(dims, token_ids, dtype="bfloat16"))
    write_random_qwen2_weights(tmp_path, dims, seed=0, progress=False, max_shard_bytes=200_000)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shapes = qwen2_tensor_shapes(dims)
    assert set(index["weight_map"]) == set(shapes) and "lm_head.weight" in shapes
    assert index["metadata"]["total_size"] == sum(math.prod(s) * 2 for s in shapes.values())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"

    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    state = model.state_dict()
    for file in files:
        for name, tensor in load_file(tmp_path / file).items():
            assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("shape, num_params", [
    ("qwen2-0.5b", 494_032_768), ("qwen2-1.5b", 1_543_714_304), ("qwen2-7b", 7_615_616_512),
])
def test_shapes_have_released_parameter_counts(shape, num_params):
    shapes = qwen2_tensor_shapes(SHAPES[shape])
    assert sum(math.prod(s) for s in shapes.values()) == num_params
    assert ("lm_head.weight" in shapes) == (not SHAPES[shape]["tie_word_embeddings"])


def test_7b_shards_stay_under_limit():
    shapes = qwen2_tensor_shapes(SHAPES["qwen2-7b"])
    shards = plan_shards(shapes, demo_model.MAX_SHARD_BYTES)
    assert len(shards) > 1
    assert [name for shard in shards for name in shard] == list(shapes)
    for shard in shards:
        assert sum(math.prod(shapes[name]) * 2 for name in shard) <= demo_model.MAX_SHARD_BYTES


def test_ensure_demo_model_builds_once_and_atomically(tmp_path, monkeypatch):
    builds = []

    def fake_write_demo_model(out_dir):
        builds.append(Path(out_dir))
        assert Path(out_dir).parent == tmp_path and Path(out_dir).name != "demo-qwen2-v1"
        (Path(out_dir) / "config.json").write_text("{}")

    monkeypatch.setenv("TGSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(demo_model, "write_demo_model", fake_write_demo_model)
    assert ensure_demo_model() == tmp_path / "demo-qwen2-v1"
    assert ensure_demo_model() == tmp_path / "demo-qwen2-v1"
    assert len(builds) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["demo-qwen2-v1"]
    assert (tmp_path / "demo-qwen2-v1" / "config.json").exists()


def test_unknown_shape_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="qwen2-7b"):
        write_demo_model(tmp_path, "llama-7b")
