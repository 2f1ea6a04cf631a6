"""RotaryEmbedding against transformers' Qwen2 / Llama rotary embedding on the same q, k and positions."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb as qwen2_apply

from tgserve.core.layers.rope_frequencies import UnsupportedRopeType
from tgserve.core.layers.rotary import RotaryEmbedding, apply_rotary
from tgserve.core.model_config import ModelConfig

_MAX_POSITIONS = 8192
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
# Qwen2's model cards: YaRN over the original window, written the old way (`rope_scaling`, `type`).
_QWEN2_YARN = {"rope_theta": 1_000_000.0, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 2048}}
# DeepSeek-style YaRN: mscale over mscale_all_dim, non-default betas, an untruncated ramp.
_YARN_MSCALE = {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 8.0, "original_max_position_embeddings": 1024,
                "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2, "truncate": False}
_YARN_ATTENTION = {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 2.0, "original_max_position_embeddings": 4096,
                   "attention_factor": 0.9}

# case -> (config class, rotary class, apply, config fields, max_position_embeddings, table length).
# A table longer than max_position_embeddings is what the server builds for --max-total-tokens past it;
# the positions asked of transformers always include the last row, so dynamic NTK's sequence length
# there equals the table's length, the one case where the two definitions coincide.
_CASES = {
    "qwen2-default": (Qwen2Config, Qwen2RotaryEmbedding, qwen2_apply,
                      {"head_dim": 64, "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}},
                      _MAX_POSITIONS, _MAX_POSITIONS),
    "llama-default": (LlamaConfig, LlamaRotaryEmbedding, llama_apply,
                      {"head_dim": 128, "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0}},
                      _MAX_POSITIONS, _MAX_POSITIONS),
    "llama-llama3": (LlamaConfig, LlamaRotaryEmbedding, llama_apply, {"head_dim": 64, "rope_parameters": _LLAMA3},
                     _MAX_POSITIONS, _MAX_POSITIONS),
    "llama-linear": (LlamaConfig, LlamaRotaryEmbedding, llama_apply,
                     {"head_dim": 32, "rope_parameters": {"rope_type": "linear", "rope_theta": 10_000.0,
                                                          "factor": 4.0}}, _MAX_POSITIONS, _MAX_POSITIONS),
    "qwen2-yarn": (Qwen2Config, Qwen2RotaryEmbedding, qwen2_apply, {"head_dim": 64, **_QWEN2_YARN}, 2048,
                   _MAX_POSITIONS),
    "llama-yarn-mscale": (LlamaConfig, LlamaRotaryEmbedding, llama_apply, {"head_dim": 64, "rope_parameters":
                          _YARN_MSCALE}, 1024, _MAX_POSITIONS),
    "llama-yarn-attention-factor": (LlamaConfig, LlamaRotaryEmbedding, llama_apply, {"head_dim": 128,
                                    "rope_parameters": _YARN_ATTENTION}, 4096, _MAX_POSITIONS),
    "qwen2-dynamic-past-window": (Qwen2Config, Qwen2RotaryEmbedding, qwen2_apply, {"head_dim": 64, "rope_parameters": {
                                  "rope_type": "dynamic", "rope_theta": 1_000_000.0, "factor": 2.0}}, 1024,
                                  _MAX_POSITIONS),
    "llama-dynamic-in-window": (LlamaConfig, LlamaRotaryEmbedding, llama_apply, {"head_dim": 32, "rope_parameters": {
                                "rope_type": "dynamic", "rope_theta": 10_000.0, "factor": 4.0}}, _MAX_POSITIONS,
                                _MAX_POSITIONS),
}


def rotate(rotary: RotaryEmbedding, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    """As the model applies it: one table lookup per step, queries and keys rotated in one call."""
    rotated = apply_rotary(rotary.lookup(positions), torch.cat([q, k], dim=1))
    return rotated.split([q.shape[1], k.shape[1]], dim=1)


@pytest.mark.parametrize("case", list(_CASES))
def test_rotary_matches_transformers(case):
    config_cls, hf_rotary_cls, hf_apply, extra, max_position_embeddings, num_positions = _CASES[case]
    hf_config = config_cls.from_dict(dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=max_position_embeddings, **extra))
    # Build ours the way the model does: from config.json through ModelConfig.
    model_config = ModelConfig.from_dict(hf_config.to_dict())
    model_config = dataclasses.replace(model_config, max_sequence_tokens=num_positions)
    assert model_config.num_rope_positions == num_positions
    ours = RotaryEmbedding(model_config.head_dim, model_config.num_rope_positions, model_config.rope_theta,
                           model_config.rope_scaling, torch.float32, torch.device("cpu"))

    generator = torch.Generator().manual_seed(0)
    head_dim = model_config.head_dim
    positions = torch.cat([torch.arange(5), torch.randint(0, num_positions, (27,), generator=generator),
                           torch.tensor([num_positions - 1])])
    q = torch.randn(len(positions), 4, head_dim, generator=generator)
    k = torch.randn(len(positions), 2, head_dim, generator=generator)
    q_ours, k_ours = rotate(ours, positions, q, k)

    hf_rotary = hf_rotary_cls(hf_config)
    cos, sin = hf_rotary(q, positions.unsqueeze(0))  # [1, T, head_dim]
    q_ref, k_ref = hf_apply(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), cos, sin)
    assert (hf_rotary.attention_scaling == 1.0) == ("yarn" not in case)
    torch.testing.assert_close(q_ours, q_ref[0].transpose(0, 1), rtol=0, atol=2e-6)
    torch.testing.assert_close(k_ours, k_ref[0].transpose(0, 1), rtol=0, atol=2e-6)


def test_yarn_attention_factor_and_ramp_follow_the_paper():
    """Qwen2's YaRN: cos/sin scaled by 0.1 ln(4) + 1; the fastest frequency kept, the slowest divided by 4."""
    rotary = RotaryEmbedding(64, 16, 1_000_000.0, {"rope_type": "yarn", "factor": 4.0,
                             "original_max_position_embeddings": 2048}, torch.float32, torch.device("cpu"))
    plain = RotaryEmbedding(64, 16, 1_000_000.0, None, torch.float32, torch.device("cpu"))
    mscale = 0.1 * math.log(4.0) + 1.0
    torch.testing.assert_close(rotary.cos[0], torch.full((64,), mscale))
    torch.testing.assert_close(rotary.cos[1, 0], plain.cos[1, 0] * mscale)  # high frequency: extrapolated
    slowest = plain.signed_sin[1, 63] / 4  # sin(x) ~ x for the slowest frequency: interpolated by the factor
    torch.testing.assert_close(rotary.signed_sin[1, 63], slowest * mscale, rtol=1e-4, atol=0)


def test_position_zero_is_identity_and_norms_are_kept():
    rotary = RotaryEmbedding(16, 64, 10_000.0, None, torch.float32, torch.device("cpu"))
    q, k = torch.randn(3, 2, 16), torch.randn(3, 1, 16)
    q_rot, k_rot = rotate(rotary, torch.tensor([0, 0, 0]), q, k)
    torch.testing.assert_close(q_rot, q)
    torch.testing.assert_close(k_rot, k)
    q_rot, _ = rotate(rotary, torch.tensor([1, 17, 63]), q, k)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))


def test_scores_depend_on_relative_position_only():
    rotary = RotaryEmbedding(32, 256, 10_000.0, None, torch.float32, torch.device("cpu"))
    q, k = torch.randn(1, 1, 32), torch.randn(1, 1, 32)

    def score(q_pos, k_pos):
        q_rot, _ = rotate(rotary, torch.tensor([q_pos]), q, k)
        _, k_rot = rotate(rotary, torch.tensor([k_pos]), q, k)
        return (q_rot * k_rot).sum()

    torch.testing.assert_close(score(10, 3), score(107, 100), rtol=1e-4, atol=1e-4)


def test_unknown_rope_type_is_refused():
    with pytest.raises(UnsupportedRopeType, match="unsupported rope_type 'longrope'"):
        RotaryEmbedding(16, 64, 10_000.0, {"rope_type": "longrope", "factor": 2.0}, torch.float32, torch.device("cpu"))
