"""The rope scaling a server runs: the checkpoint's, TGI's --rope-scaling / --rope-factor over it, and
the positions that bound --max-total-tokens."""
from __future__ import annotations

import logging
import math

import pytest

from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.model_config import ModelConfig
from tgserve.core.rope_scaling import rope_from_flags, serving_model_config

# Qwen2-7B-Instruct's config.json with the YaRN block its model card adds for inputs past 32k tokens.
_QWEN2_7B = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
             "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
             "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
_QWEN2_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def _model(rope_scaling: dict | None = None, max_position_embeddings: int = 32768, **raw) -> ModelConfig:
    return ModelConfig.from_dict({**_QWEN2_7B, "max_position_embeddings": max_position_embeddings,
                                  "rope_scaling": rope_scaling, **raw})


@pytest.mark.parametrize("scaling, factor, expected", [
    (None, None, None),
    ("dynamic", None, {"rope_type": "dynamic", "factor": 1.0}),  # scaling alone implies factor 1.0
    ("linear", None, {"rope_type": "linear", "factor": 1.0}),
    (None, 2.0, {"rope_type": "linear", "factor": 2.0}),  # factor alone implies linear
    ("dynamic", 4.0, {"rope_type": "dynamic", "factor": 4.0}),
])
def test_flags_combine_as_tgi_launcher(scaling, factor, expected):
    assert rope_from_flags(scaling, factor) == expected


def test_qwen2_model_card_yarn_is_read_from_config_json():
    model = _model(_QWEN2_YARN)
    assert model.rope_scaling["rope_type"] == "yarn" and model.rope_theta == 1000000.0
    assert model.max_context_tokens == 131072
    assert _model(None).rope_scaling is None and _model(None).max_context_tokens == 32768


def test_yarn_window_and_factor_defaults_follow_transformers():
    assert _model({"rope_type": "yarn", "factor": 4.0}).rope_scaling["original_max_position_embeddings"] == 32768
    phi3_style = _model({"rope_type": "yarn", "factor": 4.0}, original_max_position_embeddings=4096)
    assert phi3_style.rope_scaling["original_max_position_embeddings"] == 4096
    deepseek_style = _model({"rope_type": "yarn", "original_max_position_embeddings": 4096},
                            max_position_embeddings=163840)
    assert deepseek_style.rope_scaling["factor"] == 40.0 and deepseek_style.max_context_tokens == 163840


def test_context_of_each_rope_type():
    assert _model({"rope_type": "linear", "factor": 2.0}, 4096).max_context_tokens == 8192
    assert _model({"rope_type": "dynamic", "factor": 2.0}, 4096).max_context_tokens is None
    llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    assert _model(llama31, 131072).max_context_tokens == 131072  # the config states more than 8 x 8192


def test_dynamic_always_measures_from_max_position_embeddings():
    scaling = _model({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 1}, 4096).rope_scaling
    assert scaling["original_max_position_embeddings"] == 4096


def test_checkpoint_scaling_is_kept_without_flags_and_tables_cover_the_served_length():
    served = serving_model_config(_model(_QWEN2_YARN), ServerConfig())
    assert served.rope_scaling["rope_type"] == "yarn" and served.num_rope_positions == 32768
    longer = serving_model_config(_model(_QWEN2_YARN), ServerConfig(max_total_tokens=131072))
    assert longer.num_rope_positions == 131072 and longer.max_sequence_tokens == 131072
    shorter = serving_model_config(_model(_QWEN2_YARN), ServerConfig(max_total_tokens=4096))
    assert shorter.num_rope_positions == 32768 and shorter.max_sequence_tokens is None


def test_flags_replace_the_checkpoint_scaling(caplog):
    with caplog.at_level(logging.WARNING):
        served = serving_model_config(_model(_QWEN2_YARN), ServerConfig(rope_scaling="dynamic", rope_factor=2.0))
    assert served.rope_scaling == {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32768}
    assert "replace the checkpoint's yarn rope scaling" in caplog.text
    linear = serving_model_config(_model(None, 4096), ServerConfig(rope_factor=3.0, max_total_tokens=12288))
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 3.0} and linear.num_rope_positions == 12288


def test_total_tokens_past_the_positions_are_refused_with_a_way_out():
    with pytest.raises(ConfigError) as error:
        serving_model_config(_model(None, 4096), ServerConfig(max_total_tokens=8192))
    assert str(error.value).startswith("`max_total_tokens`(8192) must be <= 4096, the positions this model covers")
    assert "`--rope-factor 2`" in str(error.value) and "--rope-scaling dynamic" in str(error.value)
    with pytest.raises(ConfigError, match=r"must be <= 131072, .*\(yarn, factor 4.0 over .*Decrease `--max-total"):
        serving_model_config(_model(_QWEN2_YARN), ServerConfig(max_total_tokens=131073))
    with pytest.raises(ConfigError, match=r"must be <= 8192, .*\(linear, factor 2.0"):
        serving_model_config(_model(None, 4096), ServerConfig(rope_factor=2.0, max_total_tokens=8193))
    stretched = serving_model_config(_model(None, 4096), ServerConfig(rope_scaling="dynamic", max_total_tokens=65536))
    assert stretched.num_rope_positions == 65536  # dynamic NTK: any length


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "longrope", "factor": 2.0}, "rope scaling type 'longrope' in config.json is not supported"),
    ({"rope_type": "linear"}, "rope scaling 'linear' in config.json needs a positive number `factor`. Given: None"),
    ({"rope_type": "yarn", "factor": "4"}, "needs a positive number `factor`. Given: 4"),
])
def test_unusable_checkpoint_scaling_is_a_config_error(scaling, message):
    with pytest.raises(ConfigError, match=message):
        serving_model_config(_model(scaling), ServerConfig())


@pytest.mark.parametrize("fields, message", [
    ({"rope_scaling": "yarn"}, "`--rope-scaling` must be one of linear, dynamic. Given: yarn"),
    ({"rope_factor": 0.5}, "`--rope-factor` must be a number >= 1.0"),
    ({"rope_factor": math.nan}, "`--rope-factor` must be a number >= 1.0"),
    ({"rope_factor": math.inf}, "`--rope-factor` must be a number >= 1.0"),
])
def test_server_config_checks_the_rope_flags(fields, message):
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**fields)
