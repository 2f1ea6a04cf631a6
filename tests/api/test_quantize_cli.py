"""`tgserve quantize` on the demo checkpoint: the Hugging Face layouts, quality against round-to-nearest,
refusals before any work, and no half-written output folder.

The dequantizers and the round-to-nearest baseline below are written from the published layouts
(AutoGPTQ's QuantLinear v1 packing, AutoAWQ's WQLinear_GEMM interleaved nibbles), not with tgserve's code.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

import tgserve.checkpoints.quantize.cli as quantize_cli
import tgserve.checkpoints.quantize.writer as quantize_writer
from tgserve.api.cli import main

from .conftest import TEST_SERVER_FLAGS, server_factory
from .quantized_oracle import assert_serves_like_transformers

CORPUS = Path(quantize_cli.__file__).resolve().parent.parent / "data" / "calibration_corpus.txt"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SEQ_TOKENS, NUM_SAMPLES = 256, 2  # small calibration: 512 tokens, the minimum the command accepts
# (method, flags, bits, group size, sym): act-order asym with small groups; sym with a partial last group
# (down_proj has 352 inputs: groups of 128, 128, 96); AWQ GEMM.
RUNS = {
    "gptq-actorder": ("gptq", ["--act-order", "--no-sym", "--group-size", "32"], 4, 32, False),
    "gptq-sym-g128": ("gptq", ["--group-size", "128"], 4, 128, True),
    "awq": ("awq", ["--group-size", "32"], 4, 32, False),
    "awq-salient": ("awq", ["--group-size", "32"], 4, 32, False),  # on `salient_model_dir`
}
# The written layers' output error as a fraction of round-to-nearest's, at most. AWQ gains little on
# the demo model, whose activations have no outlier channels; on the same function with a few salient
# input channels (`salient_model_dir`) it must recover most of what round-to-nearest loses there.
MAX_ERROR_VS_RTN = {"gptq-actorder": 0.8, "gptq-sym-g128": 0.8, "awq": 0.95, "awq-salient": 0.5}
SALIENT_CHANNELS, SALIENT_GAIN = (3, 40, 77, 101), 16.0
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble j of a word holds output 8c + AWQ_ORDER[j]


def _quantize(model_dir: Path, out_dir: Path, method: str, flags: list[str], calibration: str = "builtin") -> int:
    return main(["quantize", "--method", method, *flags, "--calibration", calibration,
                 "--seq-len", str(SEQ_TOKENS), "--num-samples", str(NUM_SAMPLES), str(model_dir), str(out_dir)])


@pytest.fixture(scope="module")
def salient_model_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model's function with a few input channels of every q/k/v and gate/up made salient: the
    norm before them multiplies those channels by SALIENT_GAIN and their weight columns are divided by it
    (AWQ's premise: large activations meet small weights, which round-to-nearest rounds away)."""
    out = tmp_path_factory.mktemp("salient") / "model"
    shutil.copytree(demo_model_dir, out)
    tensors = load_file(str(out / "model.safetensors"))
    channels = list(SALIENT_CHANNELS)
    for key in list(tensors):
        if key.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            tensors[key][channels] *= SALIENT_GAIN
        elif key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            tensors[key][:, channels] /= SALIENT_GAIN
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _source_of(name: str, demo_model_dir: Path, salient_model_dir: Path) -> Path:
    return salient_model_dir if name == "awq-salient" else demo_model_dir


class _QuantizedDirs:
    """RUNS' output folders, each quantized on first use (so `-k` runs quantize only what they test)."""

    def __init__(self, root: Path, demo_model_dir: Path, salient_model_dir: Path) -> None:
        self.root, self.demo_model_dir, self.salient_model_dir = root, demo_model_dir, salient_model_dir

    def __getitem__(self, name: str) -> Path:
        out = self.root / name
        if not out.exists():
            method, flags, *_rest = RUNS[name]
            source = _source_of(name, self.demo_model_dir, self.salient_model_dir)
            assert _quantize(source, out, method, flags) == 0
        return out


@pytest.fixture(scope="module")
def quantized_dirs(demo_model_dir: Path, salient_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> _QuantizedDirs:
    return _QuantizedDirs(tmp_path_factory.mktemp("quantized"), demo_model_dir, salient_model_dir)


# ---------------------------------------------------------------- independent dequantizers


def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [r, c] -> int64 [r * 32/bits, c]: value j of word r is row r * 32/bits + j (low bits first)."""
    per_word = 32 // bits
    parts = [(words.to(torch.int64) >> (bits * j)) & (2**bits - 1) for j in range(per_word)]
    return torch.stack(parts, dim=1).reshape(words.shape[0] * per_word, words.shape[1])


def dequantize_gptq(tensors: dict, prefix: str, bits: int) -> torch.Tensor:
    """W [out, in] from AutoGPTQ v1 tensors: W[o, i] = scales[g, o] * (q[i, o] - (qzeros[g, o] + 1)), g = g_idx[i]."""
    q = _unpack_rows(tensors[f"{prefix}.qweight"], bits)  # [in, out]
    zeros = _unpack_rows(tensors[f"{prefix}.qzeros"].t(), bits).t() + 1  # [groups, out]
    g_idx = tensors[f"{prefix}.g_idx"].long()
    scales = tensors[f"{prefix}.scales"].float()
    return (scales[g_idx] * (q - zeros[g_idx]).float()).t()


def _unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [r, c] -> int64 [r, 8c] with AWQ's interleaved nibble order undone."""
    out = torch.empty(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
    for j, position in enumerate(AWQ_ORDER):
        out[:, position::8] = (words.to(torch.int64) >> (4 * j)) & 15
    return out


def dequantize_awq(tensors: dict, prefix: str, group_size: int) -> torch.Tensor:
    """W [out, in] from AutoAWQ GEMM tensors: W^T[i, o] = (q[i, o] - z[i // gs, o]) * s[i // gs, o]."""
    q = _unpack_awq(tensors[f"{prefix}.qweight"])  # [in, out]
    zeros = _unpack_awq(tensors[f"{prefix}.qzeros"])  # [groups, out]
    groups = torch.arange(q.shape[0]) // group_size
    return ((q - zeros[groups]).float() * tensors[f"{prefix}.scales"].float()[groups]).t()


def rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest with per-(row, group) min/max, dequantized: the baseline without calibration."""
    maxq = 2**bits - 1
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[1], group_size):
        w = weight[:, start:start + group_size]
        low, high = w.min(1, keepdim=True).values.clamp(max=0), w.max(1, keepdim=True).values.clamp(min=0)
        if sym:
            high = torch.maximum(high, -low)
            scale, zero = 2 * high / maxq, torch.full_like(high, (maxq + 1) // 2)
        else:
            scale = (high - low) / maxq
            zero = torch.round(-low / scale)
        scale = scale.clamp(min=1e-6).half().float()
        out[:, start:start + group_size] = (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero) * scale
    return out


# ---------------------------------------------------------------- layer outputs on calibration activations


def _calibration_ids(model_dir: Path) -> torch.Tensor:
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(CORPUS.read_text()).ids
    return torch.tensor(ids[:SEQ_TOKENS * NUM_SAMPLES]).reshape(NUM_SAMPLES, SEQ_TOKENS)


def _layer_inputs(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, dict, torch.Tensor]]:
    """(input hidden states, keyword arguments, output) of each decoder layer of the float model."""
    records = []

    def hook(_module, args, kwargs, output):
        kept = {k: v for k, v in kwargs.items() if k not in ("cache", "use_cache", "past_key_values")}
        records.append((args[0] if args else kwargs["hidden_states"], kept, output))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return records


def _layer_errors(model, records) -> list[float]:
    with torch.no_grad():
        return [float((model.model.layers[i](h, **kw) - out).pow(2).mean()) for i, (h, kw, out) in enumerate(records)]


def _load_dequantized(model_dir: Path, quantized_dir: Path, name: str):
    """The float model with every tensor taken from the quantized checkpoint (linears dequantized here)."""
    method, _flags, bits, group_size, _sym = RUNS[name]
    tensors = load_file(str(quantized_dir / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    state = {}
    for key, value in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "qweight":
            state[f"{prefix}.weight"] = (dequantize_gptq(tensors, prefix, bits) if method == "gptq"
                                         else dequantize_awq(tensors, prefix, group_size))
        elif leaf not in ("qzeros", "scales", "g_idx"):
            state[key] = value.float()
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("name", list(RUNS))
def test_layer_outputs_beat_round_to_nearest(name, demo_model_dir, salient_model_dir, quantized_dirs):
    """Each decoder layer, fed the float model's inputs, is closer to the float layer's output with the
    written weights than with round-to-nearest at the same bits and groups (fails if GPTQ's Hessian
    update, AWQ's scale search or scale folding, or a packing order is broken)."""
    _method, _flags, bits, group_size, sym = RUNS[name]
    source_dir = _source_of(name, demo_model_dir, salient_model_dir)
    input_ids = _calibration_ids(source_dir)
    float_model = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=torch.float32)
    records = _layer_inputs(float_model, input_ids)
    with torch.no_grad():
        for layer in float_model.model.layers:
            for linear_name in LINEARS:
                linear = layer.get_submodule(linear_name)
                linear.weight.copy_(rtn(linear.weight, bits, group_size, sym))
    rtn_errors = _layer_errors(float_model, records)
    written_errors = _layer_errors(_load_dequantized(source_dir, quantized_dirs[name], name), records)
    print(name, "written", written_errors, "round-to-nearest", rtn_errors)
    assert all(0 < e for e in written_errors), written_errors
    for index, (written, baseline) in enumerate(zip(written_errors, rtn_errors)):
        assert written < MAX_ERROR_VS_RTN[name] * baseline, (index, written_errors, rtn_errors)


@pytest.mark.parametrize("name", list(RUNS))
def test_config_and_tensor_layout(name, demo_model_dir, salient_model_dir, quantized_dirs):
    method, _flags, bits, group_size, sym = RUNS[name]
    out = quantized_dirs[name]
    demo_model_dir = _source_of(name, demo_model_dir, salient_model_dir)
    source_config = json.loads((demo_model_dir / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert config == source_config
    if method == "gptq":
        assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format",
                                   "lm_head")} == {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                                   "desc_act": name == "gptq-actorder", "sym": sym,
                                                   "checkpoint_format": "gptq", "lm_head": False}
    else:
        assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == {
            "quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / file).read_bytes() == (demo_model_dir / file).read_bytes()
    source = load_file(str(demo_model_dir / "model.safetensors"))
    tensors = load_file(str(out / "model.safetensors"))
    expected_names = set()
    for key, value in source.items():
        prefix = key.removesuffix(".weight")
        if any(key.endswith(f"{linear}.weight") for linear in LINEARS):
            out_features, in_features = value.shape
            groups = -(-in_features // group_size)
            if method == "gptq":
                shapes = {"qweight": ((in_features * bits // 32, out_features), torch.int32),
                          "qzeros": ((groups, out_features * bits // 32), torch.int32),
                          "scales": ((groups, out_features), torch.float16),
                          "g_idx": ((in_features,), torch.int32)}
            else:
                shapes = {"qweight": ((in_features, out_features // 8), torch.int32),
                          "qzeros": ((groups, out_features // 8), torch.int32),
                          "scales": ((groups, out_features), torch.float16)}
            for leaf, (shape, dtype) in shapes.items():
                tensor = tensors[f"{prefix}.{leaf}"]
                assert (tuple(tensor.shape), tensor.dtype) == (shape, dtype), (prefix, leaf)
                expected_names.add(f"{prefix}.{leaf}")
            if method == "gptq" and name != "gptq-actorder":
                assert torch.equal(tensors[f"{prefix}.g_idx"], torch.arange(in_features, dtype=torch.int32) // group_size)
            if method == "gptq" and sym:  # zero point 2**(bits-1), stored minus one: 0x77777777 for 4 bits
                assert bool((tensors[f"{prefix}.qzeros"] == 0x77777777).all())
        else:
            assert tensors[key].dtype == value.dtype and tensors[key].shape == value.shape, key
            if method == "gptq" or "layernorm" not in key:  # AWQ folds 1/s into the norms only
                assert torch.equal(tensors[key], value), key
            expected_names.add(key)
    assert set(tensors) == expected_names
    if name == "gptq-actorder":  # act-order: each group still holds group_size inputs, not in order
        g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"].long()
        assert torch.bincount(g_idx).tolist() == [32] * 11
        assert not torch.equal(g_idx, torch.arange(352) // 32)


# ---------------------------------------------------------------- refusals before any work


@pytest.fixture
def no_work(monkeypatch):
    """Make loading the model fail the test: a refusal must come before it."""
    def forbidden(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(quantize_cli, "_quantize", forbidden)


def _refused(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 1, err
    for needle in needles:
        assert needle in err, err


def test_too_little_calibration_text(demo_model_dir, tmp_path, capsys, no_work):
    short = tmp_path / "short.txt"
    short.write_text("Only a sentence or two of text. " * 20)
    _refused(capsys, _quantize(demo_model_dir, tmp_path / "out", "gptq", [], str(short)),
             "tokens", "at least 512")
    assert not (tmp_path / "out").exists()
    _refused(capsys, _quantize(demo_model_dir, tmp_path / "out", "gptq", [], str(tmp_path / "nope.txt")),
             "does not exist")


def test_checkpoints_it_cannot_handle(demo_model_dir, quantized_dirs, tmp_path, capsys, no_work):
    _refused(capsys, _quantize(quantized_dirs["awq"], tmp_path / "out", "gptq", []), "already quantized", "awq")
    other = tmp_path / "gpt2"
    shutil.copytree(demo_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    _refused(capsys, _quantize(other, tmp_path / "out", "gptq", []), "'gpt2'", "llama, qwen2")
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").unlink()
    _refused(capsys, _quantize(other, tmp_path / "out", "awq", []), "no *.safetensors")
    _refused(capsys, _quantize(tmp_path / "missing", tmp_path / "out", "awq", []), "not a folder")
    # AWQ groups must divide down_proj's 352 inputs; GPTQ has no 3-bit writer here.
    _refused(capsys, _quantize(demo_model_dir, tmp_path / "out", "awq", ["--group-size", "128"]),
             "down_proj", "--group-size 128")
    _refused(capsys, _quantize(demo_model_dir, tmp_path / "out", "gptq", ["--bits", "3"]), "--bits 3")
    _refused(capsys, _quantize(demo_model_dir, tmp_path / "out", "awq", ["--act-order"]), "GPTQ options")
    (tmp_path / "out").mkdir()
    _refused(capsys, _quantize(demo_model_dir, tmp_path / "out", "gptq", []), "already exists")


def test_interrupted_write_leaves_no_output(demo_model_dir, tmp_path, monkeypatch):
    """The writer fails after model.safetensors is written: OUT_DIR must not exist, nor the partial folder."""
    def failing_copy(*_args, **_kwargs):
        assert any(tmp_path.glob(".out.partial-*/model.safetensors"))
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(quantize_writer.shutil, "copy2", failing_copy)
    with pytest.raises(OSError, match="simulated"):
        _quantize(demo_model_dir, tmp_path / "out", "gptq", ["--group-size", "32"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["gptq-actorder", "awq"])
def test_written_checkpoint_serves_like_its_dequantized_weights(name, demo_model_dir, quantized_dirs, hf_tokenizer,
                                                                tmp_path_factory):
    """The round trip: what `tgserve quantize` wrote, served by `tgserve serve` (the method detected from
    config.json), answers as transformers does in float32 on the weights this file's own dequantizer
    reads from it (greedy ids, logprobs), and /info names the method, bits and group size."""
    method, _flags, bits, group_size, _sym = RUNS[name]
    quantized = quantized_dirs[name]
    reference = tmp_path_factory.mktemp("dequantized") / name
    _load_dequantized(demo_model_dir, quantized, name).save_pretrained(str(reference))
    with server_factory(tmp_path_factory, *TEST_SERVER_FLAGS) as start:
        server = start(quantized, "--dtype", "float32")
        assert_serves_like_transformers(server.url, reference, demo_model_dir, hf_tokenizer)
        info = httpx.get(f"{server.url}/info", timeout=10).json()["quantization"]
    assert (info["method"], info["bits"], info["group_size"], info["is_prequantized"]) == (method, bits, group_size,
                                                                                           True)
