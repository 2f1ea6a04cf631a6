"""A GGUF file as a checkpoint, against transformers' own GGUF loader (which dequantizes every tensor to
float through `gguf`): config from the metadata, every weight as loaded (q/k rows un-permuted, Q4_1 /
Q8_0 in affine form), greedy ids of small mixed-type llama and qwen2 files written here with `gguf`'s
own quantizers (Q4_0, Q4_1, Q8_0 kept as integers; Q4_K, Q5_0, Q6_K, F16 dequantized), and the errors
for what tgserve cannot serve."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tgserve.backends.cpu.plugin import native_ops
from tgserve.checkpoints.smollm2 import find_wheel
from tgserve.core.gguf_source import GgufCheckpoint, GgufError
from tgserve.core.layers.attention import TorchPagedAttention
from tgserve.core.layers.linear import LinearMethod
from tgserve.core.model_config import ModelConfig
from tgserve.core.model_source import ModelNotFound, resolve_model
from tgserve.core.models.llama import LlamaForCausalLM
from tgserve.core.quantization.quant_config import resolve_quantization
from tgserve.core.quantization.registry import make_quantized_method

from .engine_harness import request, run_all, running_engine
from .gguf_files import TOKENS, model_metadata, write_gguf

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
ENGINE_LIMITS = dict(dtype="float32", max_input_tokens=64, max_total_tokens=128, max_batch_prefill_tokens=128,
                     max_batch_total_tokens=1024)


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return find_wheel().gguf_path


@pytest.fixture(scope="module")
def checkpoint(smollm2_gguf) -> GgufCheckpoint:
    return GgufCheckpoint(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    """transformers' float32 model dequantized from the same GGUF."""
    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


def test_config_comes_from_the_metadata_as_transformers_reads_it(checkpoint, hf_model):
    raw = checkpoint.raw_config
    hf = hf_model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert raw[key] == getattr(hf, key), key
    assert raw["model_type"] == "llama" and raw["rope_theta"] == hf.rope_parameters["rope_theta"] == 100000.0
    assert raw["eos_token_id"] == [2] and raw["bos_token_id"] == 1
    section = raw["quantization_config"]
    assert section["quant_method"] == "gguf" and section["file_type"] == "MOSTLY_Q4_1"
    assert (section["bits"], section["group_size"]) == (4, 32)
    assert Counter(section["tensor_types"].values()) == {"Q4_1": 210, "Q8_0": 2}  # 30 x 7 linears; embedding, lm_head
    assert section["tensor_types"]["lm_head"] == section["tensor_types"]["model.embed_tokens"] == "Q8_0"


def test_every_loaded_weight_equals_transformers_dequantization(checkpoint, hf_model):
    config = ModelConfig.from_dict(checkpoint.raw_config)
    method = make_quantized_method(resolve_quantization(None, checkpoint.raw_config), torch.float32, LinearMethod())
    attention = TorchPagedAttention(config.num_attention_heads, config.num_key_value_heads, config.head_dim, 16)
    model = LlamaForCausalLM(config, method, attention, torch.float32, torch.device("cpu"))
    model.load_weights(checkpoint.iter_weights())
    expected = hf_model.state_dict()

    def weight(linear, bits):
        kernel, (affine, _) = linear.prepared
        assert kernel.name == "reference" and affine.bits == bits and affine.q.dtype == torch.uint8
        return affine.dequantize()

    def close(actual, *names):
        torch.testing.assert_close(actual, torch.cat([expected[name] for name in names]), rtol=1e-5, atol=1e-6)

    torch.testing.assert_close(model.embed_tokens.weight.data, expected["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.norm.weight.data, expected["model.norm.weight"], rtol=0, atol=0)
    close(weight(model.lm_head, 8), "lm_head.weight")
    for index, layer in enumerate(model.layers):
        at = f"model.layers.{index}."
        close(weight(layer.qkv_proj, 4), *(at + f"self_attn.{p}_proj.weight" for p in "qkv"))
        close(weight(layer.o_proj, 4), at + "self_attn.o_proj.weight")
        close(weight(layer.gate_up_proj, 4), at + "mlp.gate_proj.weight", at + "mlp.up_proj.weight")
        close(weight(layer.down_proj, 4), at + "mlp.down_proj.weight")
        torch.testing.assert_close(layer.input_layernorm.weight.data, expected[at + "input_layernorm.weight"])
        torch.testing.assert_close(layer.post_attention_layernorm.weight.data,
                                   expected[at + "post_attention_layernorm.weight"])


def test_tokenizer_and_chat_template_come_from_the_file(checkpoint, smollm2_gguf):
    ours = checkpoint.tokenizer((2,))
    hf = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    expected = hf.apply_chat_template(FRANCE, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ours.encode(ours.apply_chat_template(FRANCE)) == expected
    assert ours.apply_chat_template(FRANCE).endswith("<|im_start|>assistant\n") and ours.eos_token_ids == (2,)


def random_model(path: Path, architecture: str, types: dict[str, str], seed: int) -> Path:
    """A 2-layer model of `architecture` with random weights of the given GGUF types (hidden 256, so
    K-quants' 256-input super-blocks fit) and a small byte-level tokenizer."""
    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, ffn, vocab = 256, 4, 2, 512, len(TOKENS)
    shapes = {"attn_q": (hidden, hidden), "attn_k": (hidden // 2, hidden), "attn_v": (hidden // 2, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn)}
    tensors = {"token_embd.weight": (rng.standard_normal((vocab, hidden)) * 0.05, types["token_embd"]),
               "output_norm.weight": (1 + 0.1 * rng.standard_normal(hidden), "F32")}
    if "output" in types:
        tensors["output.weight"] = (rng.standard_normal((vocab, hidden)) * 0.1, types["output"])
    for block in range(2):
        for name, shape in shapes.items():
            kind = types.get(f"{block}.{name}", types["default"])
            tensors[f"blk.{block}.{name}.weight"] = (rng.standard_normal(shape) / np.sqrt(shape[1]), kind)
        for norm in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{block}.{norm}.weight"] = (1 + 0.1 * rng.standard_normal(hidden), "F32")
        if architecture == "qwen2":
            for name in ("attn_q", "attn_k", "attn_v"):
                tensors[f"blk.{block}.{name}.bias"] = (rng.standard_normal(shapes[name][0]) * 0.5, "F32")
    return write_gguf(path, architecture, model_metadata(architecture, hidden, heads, kv_heads, ffn, 2, vocab),
                      tensors, with_tokenizer=True)


MIXED_TYPES = {
    # llama: untied Q6_K output; layer 0 q/k/v Q4_0 (int4), o Q6_K, gate/up Q4_1, down Q8_0 (int8); layer 1
    # q/k Q4_0 with v Q8_0 (mixed: dequantized), o F16, gate/up Q4_K, down Q5_0.
    "llama": {"default": "Q4_0", "token_embd": "Q8_0", "output": "Q6_K", "0.attn_output": "Q6_K",
              "0.ffn_gate": "Q4_1", "0.ffn_up": "Q4_1", "0.ffn_down": "Q8_0", "1.attn_v": "Q8_0",
              "1.attn_output": "F16", "1.ffn_gate": "Q4_K", "1.ffn_up": "Q4_K", "1.ffn_down": "Q5_0"},
    # qwen2: q/k/v biases, tied Q8_0 embedding (lm_head int8), Q4_1 elsewhere but a Q6_K down projection.
    "qwen2": {"default": "Q4_1", "token_embd": "Q8_0", "1.ffn_down": "Q6_K"},
}


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_mixed_type_file_generates_transformers_greedy_ids(architecture, tmp_path, caplog):
    path = random_model(tmp_path / f"{architecture}.gguf", architecture, MIXED_TYPES[architecture],
                        seed=len(architecture))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    prompts = [[1, 54, 35, 28, 46, 31], [9, 8, 7, 100, 200, 260, 12, 5, 77]]
    with caplog.at_level("INFO", logger="tgserve.core"), running_engine(path, **ENGINE_LIMITS) as engine:
        results = run_all(engine, [request(ids, max_new_tokens=8) for ids in prompts])
    for ids, result in zip(prompts, results):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        expected = out.sequences[0, len(ids):].tolist()
        assert result.ids == expected
        logprobs = torch.stack(out.logits)[:, 0].float().log_softmax(-1)
        expected_logprobs = logprobs[torch.arange(len(expected)), expected]
        torch.testing.assert_close(torch.tensor([event.logprob for event in result.events]), expected_logprobs,
                                   rtol=0, atol=1e-4)
    placement = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("GGUF tensors"))
    # The cpu backend's native kernels take Q4_0 / Q4_1 / Q8_0 where a compiler built them (else the
    # reference: torch's own int4 op runs bf16 only, its int8 op per channel only).
    int4, int8 = ("cpu-native-int4", "cpu-native-int8") if native_ops() is not None else ("reference", "reference")
    if architecture == "llama":
        assert placement == ("GGUF tensors: F16 x1 linear, dequantized to float32; Q4_0 x2 linear, dequantized to "
                             f"float32; Q4_0 x3 linear, int4 {int4} kernel; Q4_1 x2 linear, int4 {int4} kernel; "
                             "Q4_K x2 linear, dequantized to float32; Q5_0 x1 linear, dequantized to float32; "
                             "Q6_K x2 linear, dequantized to float32; Q8_0 x1 embedding, dequantized to float32; "
                             f"Q8_0 x1 linear, dequantized to float32; Q8_0 x1 linear, int8 {int8} kernel")
    else:
        assert f"Q8_0 x1 embedding, dequantized to float32; Q8_0 x1 linear, int8 {int8} kernel" in placement


def tiny(path: Path, architecture: str = "llama", extra: dict | None = None) -> Path:
    tensors = {"token_embd.weight": (np.ones((64, 32)), "F32"), "blk.0.attn_q.weight": (np.ones((32, 32)), "Q8_0"),
               **(extra or {})}
    return write_gguf(path, architecture, model_metadata(architecture, 32, 2, 2, 64, 1, 64), tensors)


def test_unsupported_architecture_is_named(tmp_path):
    with pytest.raises(GgufError, match=r"^GGUF architecture 'mamba' of m.gguf is not supported "
                                        r"\(supported: llama, qwen2\)$"):
        GgufCheckpoint(tiny(tmp_path / "m.gguf", "mamba"))


def test_unsupported_tensor_type_is_named(tmp_path):
    path = tiny(tmp_path / "t.gguf", extra={"blk.0.attn_k.weight": (np.ones((32, 32)), "I32")})
    with pytest.raises(GgufError, match=r"^GGUF tensor blk.0.attn_k.weight has type I32, which tgserve cannot load"):
        GgufCheckpoint(path)


def test_tensor_without_a_place_in_the_model_is_named(tmp_path):
    path = tiny(tmp_path / "r.gguf", extra={"rope_freqs.weight": (np.ones(8), "F32")})
    with pytest.raises(GgufError, match=r"^GGUF tensor rope_freqs.weight has no place in tgserve's llama model$"):
        GgufCheckpoint(path)


def test_model_id_names_the_file_or_a_folder_holding_one(tmp_path):
    path = tiny(tmp_path / "one" / "model.gguf") if (tmp_path / "one").mkdir() is None else None
    assert resolve_model(str(path)).gguf_file == path
    assert resolve_model(str(path.parent)).gguf_file == path
    tiny(tmp_path / "one" / "other.gguf")
    with pytest.raises(ModelNotFound, match=r"holds several .gguf files \(model.gguf, other.gguf\): pass one"):
        resolve_model(str(path.parent))


def test_float_file_is_a_float_checkpoint_and_rope_scaling_comes_from_the_metadata(tmp_path):
    metadata = {**model_metadata("llama", 32, 2, 2, 64, 1, 64), "llama.rope.scaling.type": "linear",
                "llama.rope.scaling.factor": 2.0}
    raw = GgufCheckpoint(write_gguf(tmp_path / "f.gguf", "llama", metadata, {
        "token_embd.weight": (np.ones((64, 32)), "F16"), "blk.0.attn_q.weight": (np.ones((32, 32)), "F32")})).raw_config
    assert "quantization_config" not in raw  # so --quantize may quantize it at load, as any float checkpoint
    assert resolve_quantization("eetq", raw).method == "eetq"
    assert ModelConfig.from_dict(raw).rope_scaling == {"rope_type": "linear", "factor": 2.0,
                                                       "original_max_position_embeddings": 2048}
    assert ModelConfig.from_dict(raw).max_context_tokens == 4096
