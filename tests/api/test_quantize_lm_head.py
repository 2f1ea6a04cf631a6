"""`tgserve quantize --method gptq --lm-head-bits 4|8`: the output head quantized with GPTQ, in the layout
GPTQModel writes (`lm_head: true`, a `dynamic` rule where the head's bits differ from the layers'),
on the demo checkpoint (untied head) and on a tied copy of it (the head written apart from the float
embedding, `tie_word_embeddings: false`); served through HTTP against transformers on an independent
dequantization of every written linear, the head included (AutoGPTQ v1 layout, test_quantize_cli.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import tgserve.checkpoints.quantize.cli as quantize_cli

from .conftest import TEST_SERVER_FLAGS, server_factory
from .quantized_oracle import assert_serves_like_transformers
from .test_quantize_cli import _calibration_ids, _quantize, _refused, dequantize_gptq, rtn

GROUP_SIZE = 32
# name -> (tied source?, --lm-head-bits, layer flags, is_sym)
RUNS = {
    "head8": (False, 8, ["--group-size", str(GROUP_SIZE)], True),
    "head4-tied": (True, 4, ["--group-size", str(GROUP_SIZE), "--act-order", "--no-sym"], False),
}
# The head's dequantized weight against the float head, ||W_q - W|| / ||W|| at most (measured on the
# demo model: 0.0055 at 8 bits, 0.086 at 4 bits asym g32), and its output error on the final norm's
# outputs as a fraction of round-to-nearest's at the same bits and groups (measured 0.56 at both).
MAX_RELATIVE_ERROR = {8: 0.02, 4: 0.15}
MAX_ERROR_VS_RTN = 0.8


@pytest.fixture(scope="module")
def tied_model_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint tied as SmolLM2 / Qwen2-0.5B are: no lm_head.weight, the embedding is the head."""
    out = tmp_path_factory.mktemp("tied") / "model"
    shutil.copytree(demo_model_dir, out)
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}, indent=2))
    return out


@pytest.fixture(scope="module")
def sources(demo_model_dir: Path, tied_model_dir: Path) -> dict[str, Path]:
    return {name: tied_model_dir if RUNS[name][0] else demo_model_dir for name in RUNS}


@pytest.fixture(scope="module")
def quantized(sources, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm-head")
    for name, (_tied, head_bits, flags, _sym) in RUNS.items():
        assert _quantize(sources[name], root / name, "gptq", [*flags, "--lm-head-bits", str(head_bits)]) == 0
    return {name: root / name for name in RUNS}


def _float_head(source: Path) -> torch.Tensor:
    tensors = load_file(str(source / "model.safetensors"))
    return tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]).float()


def _dequantized_reference(quantized_dir: Path, out: Path) -> Path:
    """A float checkpoint: the written config without quantization_config, every qweight dequantized here."""
    config = json.loads((quantized_dir / "config.json").read_text())
    section = config.pop("quantization_config")
    tensors = load_file(str(quantized_dir / "model.safetensors"))
    state = {}
    for key, value in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "qweight":
            rule = section.get("dynamic", {}).get("+:^lm_head$", {}) if prefix == "lm_head" else {}
            bits = rule.get("bits", section["bits"])
            state[f"{prefix}.weight"] = dequantize_gptq(tensors, prefix, bits).contiguous()
        elif leaf not in ("qzeros", "scales", "g_idx"):
            state[key] = value.float()
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2))
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy2(quantized_dir / file, out / file)
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_config_and_head_tensors(name, sources, quantized):
    is_tied, head_bits, _flags, _sym = RUNS[name]
    config = json.loads((quantized[name] / "config.json").read_text())
    section = config["quantization_config"]
    assert section["lm_head"] is True and section["bits"] == 4
    expected_dynamic = {"+:^lm_head$": {"bits": head_bits, "group_size": GROUP_SIZE}} if head_bits != 4 else None
    assert section.get("dynamic") == expected_dynamic
    assert config["tie_word_embeddings"] is False
    source = load_file(str(sources[name] / "model.safetensors"))
    tensors = load_file(str(quantized[name] / "model.safetensors"))
    assert "lm_head.weight" not in tensors and ("lm_head.weight" in source) == (not is_tied)
    assert torch.equal(tensors["model.embed_tokens.weight"], source["model.embed_tokens.weight"])  # float input side
    vocab, hidden = source["model.embed_tokens.weight"].shape
    groups = hidden // GROUP_SIZE
    assert {leaf: (tuple(tensors[f"lm_head.{leaf}"].shape), tensors[f"lm_head.{leaf}"].dtype)
            for leaf in ("qweight", "qzeros", "scales", "g_idx")} == {
        "qweight": ((hidden * head_bits // 32, vocab), torch.int32),
        "qzeros": ((groups, vocab * head_bits // 32), torch.int32),
        "scales": ((groups, vocab), torch.float16), "g_idx": ((hidden,), torch.int32)}


@pytest.mark.parametrize("name", list(RUNS))
def test_head_dequantizes_close_to_the_float_head(name, sources, quantized):
    """The written head is near the float head, and on the final norm's outputs closer than
    round-to-nearest (fails if the head's Hessian is not its input's, or the packing is wrong)."""
    _tied, head_bits, _flags, is_sym = RUNS[name]
    weight = _float_head(sources[name])
    written = dequantize_gptq(load_file(str(quantized[name] / "model.safetensors")), "lm_head", head_bits)
    relative = float((written - weight).norm() / weight.norm())
    assert 0 < relative < MAX_RELATIVE_ERROR[head_bits], relative
    model = AutoModelForCausalLM.from_pretrained(str(sources[name]), dtype=torch.float32)
    with torch.no_grad():
        normed = model.model(input_ids=_calibration_ids(sources[name])).last_hidden_state.reshape(-1, weight.shape[1])

    def output_error(w: torch.Tensor) -> float:
        return float((normed @ (w - weight).t()).pow(2).mean())

    baseline = output_error(rtn(weight, head_bits, GROUP_SIZE, is_sym))
    assert output_error(written) < MAX_ERROR_VS_RTN * baseline, (output_error(written), baseline)


@pytest.fixture
def no_work(monkeypatch):
    def forbidden(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(quantize_cli, "_quantize", forbidden)


def test_bad_lm_head_bits_are_refused_before_any_work(demo_model_dir, tmp_path, capsys, no_work):
    for bits in ("2", "3", "16", "0"):
        _refused(capsys, _quantize(demo_model_dir, tmp_path / "out", "gptq", ["--lm-head-bits", bits]),
                 f"--lm-head-bits {bits}", "supported: 4, 8")
    _refused(capsys, _quantize(demo_model_dir, tmp_path / "out", "awq", ["--group-size", "32", "--lm-head-bits", "4"]),
             "gptq option")
    odd = tmp_path / "odd-vocab"
    shutil.copytree(demo_model_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 4}))
    _refused(capsys, _quantize(odd, tmp_path / "out", "gptq", ["--lm-head-bits", "4"]), "lm_head", "packed")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", list(RUNS))
def test_quantized_head_serves_like_its_dequantized_weights(name, sources, quantized, hf_tokenizer, tmp_path_factory):
    """Served by `tgserve serve` (HTTP), the checkpoint with a quantized head answers as transformers
    in float32 on this file's dequantization of every written linear, lm_head included."""
    reference = _dequantized_reference(quantized[name], tmp_path_factory.mktemp("reference") / name)
    with server_factory(tmp_path_factory, *TEST_SERVER_FLAGS) as start:
        server = start(quantized[name], "--dtype", "float32")
        assert_serves_like_transformers(server.url, reference, sources[name], hf_tokenizer)
        info = httpx.get(f"{server.url}/info", timeout=10).json()["quantization"]
    assert (info["method"], info["bits"], info["is_prequantized"]) == ("gptq", 4, True)
    assert info["description"].endswith(", lm_head quantized")
