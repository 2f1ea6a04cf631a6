"""Start-up limits: ServerConfig validation, KV block sizing and derive_limits, with TGI's messages."""
from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.limits_derivation import (DEFAULT_MAX_BATCH_PREFILL_TOKENS, MIN_DERIVED_PREFILL_TOKENS,
                                            check_step_fits, derive_limits, max_context_bound, num_kv_blocks,
                                            prefill_tokens_for_speed)
from tgserve.core.model_config import ModelConfig
from tgserve.core.shape_constraints import ShapeConstraints

_HUGE_MODEL_MAX_LENGTH = int(1e30)  # what transformers reports when tokenizer_config.json sets no limit


def _model(max_position_embeddings: int = 4096) -> ModelConfig:
    return ModelConfig.from_dict({
        "model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": max_position_embeddings})


def _derive(config=None, max_position_embeddings=4096, model_max_length=None, num_blocks=1025, block_size=16,
            constraints=None, default_max_batch_prefill_tokens=DEFAULT_MAX_BATCH_PREFILL_TOKENS):
    return derive_limits(config or ServerConfig(), _model(max_position_embeddings), model_max_length,
                         num_blocks, block_size, constraints, default_max_batch_prefill_tokens)


# --- ServerConfig --------------------------------------------------------------------------------------

def test_config_defaults_are_tgi_flags():
    config = ServerConfig()
    assert (config.port, config.max_concurrent_requests, config.max_best_of, config.max_stop_sequences,
            config.max_top_n_tokens, config.max_client_batch_size) == (3000, 128, 2, 4, 5, 4)
    assert config.max_input_tokens is config.max_total_tokens is config.max_batch_total_tokens is None


@pytest.mark.parametrize("dtype", ["float64", "fp16", "int8", ""])
def test_config_rejects_unknown_dtype(dtype):
    with pytest.raises(ConfigError, match="`--dtype` must be one of float16, bfloat16, float32"):
        ServerConfig(dtype=dtype)


# Each known dtype reaching the model: tests/core/test_engine_behaviour.py::test_each_known_dtype_reaches_the_model


@pytest.mark.parametrize("name", ["max_concurrent_requests", "max_batch_size", "max_input_tokens",
                                  "max_total_tokens", "max_batch_prefill_tokens", "max_batch_total_tokens",
                                  "max_client_batch_size"])
@pytest.mark.parametrize("value", [0, -1])
def test_config_rejects_non_positive_limits(name, value):
    with pytest.raises(ConfigError, match=f"`{name}` must be > 0. Given: {value}"):
        ServerConfig(**{name: value})


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.01])
def test_config_rejects_bad_memory_fraction(fraction):
    with pytest.raises(ConfigError, match="cuda_memory_fraction"):
        ServerConfig(cuda_memory_fraction=fraction)


def test_config_error_is_a_value_error_and_config_is_frozen():
    assert issubclass(ConfigError, ValueError)
    config = ServerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_total_tokens = 10


def test_config_input_must_be_below_total():
    with pytest.raises(ConfigError, match=re.escape("`max_input_tokens`(4096) must be < `max_total_tokens`(4096)")):
        ServerConfig(max_input_tokens=4096, max_total_tokens=4096)
    assert ServerConfig(max_input_tokens=4095, max_total_tokens=4096).max_input_tokens == 4095


def test_config_total_must_fit_batch_total():
    with pytest.raises(ConfigError, match=re.escape("`max_total_tokens` must be <= `max_batch_total_tokens`")):
        ServerConfig(max_total_tokens=2048, max_batch_total_tokens=2047)
    ServerConfig(max_total_tokens=2048, max_batch_total_tokens=2048)


def test_config_prefill_must_fit_batch_total():
    with pytest.raises(ConfigError, match=re.escape("`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`")):
        ServerConfig(max_batch_prefill_tokens=4096, max_batch_total_tokens=4000)


# --- num_kv_blocks -----------------------------------------------------------------------------------

def test_kv_blocks_fill_the_memory_budget():
    # 1 MB free, 90 % wiggle room, 100 kB of activations, 1 kB blocks.
    assert num_kv_blocks(ServerConfig(), 1_000_000, 1_000, 16, 100_000) == 800
    assert num_kv_blocks(ServerConfig(cuda_memory_fraction=0.5), 1_000_000, 1_000, 16, 100_000) == 350


def test_kv_blocks_for_requested_batch_total_tokens():
    config = ServerConfig(max_batch_total_tokens=1000)
    assert num_kv_blocks(config, 10**9, 1_000, 16, 0) == 63 + 1  # ceil(1000 / 16) + the reserved block 0
    assert num_kv_blocks(ServerConfig(max_batch_total_tokens=1024), 10**9, 1_000, 16, 0) == 65


def test_kv_blocks_refuse_batch_total_tokens_beyond_memory():
    config = ServerConfig(max_batch_total_tokens=100_000)
    with pytest.raises(ConfigError, match=r"Not enough memory.*decrease `--max-batch-total-tokens`"):
        num_kv_blocks(config, 1_000_000, 1_000, 16, 100_000)


def test_kv_blocks_refuse_when_nothing_fits():
    with pytest.raises(ConfigError, match="Not enough memory"):
        num_kv_blocks(ServerConfig(), 1_000, 1_000, 16, 0)
    with pytest.raises(ConfigError, match="Not enough memory"):
        num_kv_blocks(ServerConfig(), 1_000_000, 1_000, 16, 2_000_000)  # activations eat everything


# --- derive_limits -----------------------------------------------------------------------------------

def test_defaults_come_from_the_model():
    limits = _derive()  # 1024 usable blocks of 16 = 16384 cache tokens, 4096 positions
    assert limits.max_batch_total_tokens == 16384
    assert limits.max_total_tokens == 4096
    assert limits.max_input_tokens == 4095
    assert limits.max_batch_prefill_tokens == DEFAULT_MAX_BATCH_PREFILL_TOKENS == 4096
    assert limits.max_batch_size is None
    assert (limits.num_blocks, limits.block_size) == (1025, 16)


def test_total_capped_by_cache_capacity():
    limits = _derive(num_blocks=65, block_size=16)
    assert limits.max_batch_total_tokens == 1024
    assert limits.max_total_tokens == 1024
    assert limits.max_input_tokens == 1023
    assert limits.max_batch_prefill_tokens == 1024


def test_total_capped_by_max_position_embeddings():
    limits = _derive(max_position_embeddings=512)
    assert (limits.max_total_tokens, limits.max_input_tokens, limits.max_batch_prefill_tokens) == (512, 511, 512)


def test_total_capped_by_tokenizer_model_max_length():
    assert _derive(model_max_length=2048).max_total_tokens == 2048
    assert _derive(model_max_length=_HUGE_MODEL_MAX_LENGTH).max_total_tokens == 4096  # "no limit" sentinel


def test_backend_shape_constraints_cap_limits():
    constraints = ShapeConstraints(max_tokens_per_sequence=1024, max_batch_size=8)
    limits = _derive(ServerConfig(max_batch_size=16), constraints=constraints)
    assert (limits.max_total_tokens, limits.max_input_tokens) == (1024, 1023)
    assert limits.max_batch_size == 8
    assert _derive(ServerConfig(max_batch_size=4), constraints=constraints).max_batch_size == 4


def test_explicit_flags_are_kept():
    config = ServerConfig(max_input_tokens=100, max_total_tokens=200, max_batch_prefill_tokens=300,
                          max_batch_total_tokens=1000, max_batch_size=3)
    limits = _derive(config, num_blocks=64)
    assert (limits.max_input_tokens, limits.max_total_tokens, limits.max_batch_prefill_tokens,
            limits.max_batch_total_tokens, limits.max_batch_size) == (100, 200, 300, 1000, 3)


def test_input_only_flag_derives_total_from_model():
    limits = _derive(ServerConfig(max_input_tokens=1000))
    assert (limits.max_input_tokens, limits.max_total_tokens) == (1000, 4096)


def test_derived_total_below_given_input_is_refused():
    with pytest.raises(ConfigError, match=re.escape("`max_input_tokens`(5000) must be < `max_total_tokens`(4096)")):
        _derive(ServerConfig(max_input_tokens=5000))


def test_total_beyond_cache_is_refused():
    with pytest.raises(ConfigError, match=re.escape("Not enough memory to handle `max_total_tokens=2000`")):
        _derive(ServerConfig(max_total_tokens=2000), num_blocks=65, block_size=16)


def test_prefill_beyond_cache_is_refused():
    with pytest.raises(ConfigError, match=re.escape("`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`")):
        _derive(ServerConfig(max_batch_prefill_tokens=4096), num_blocks=65, block_size=16)


def test_unchunked_backend_prefills_a_whole_prompt_in_one_step():
    constraints = ShapeConstraints(supports_chunked_prefill=False)
    limits = _derive(max_position_embeddings=8192, num_blocks=2049, constraints=constraints)
    assert limits.max_input_tokens == 8191
    assert limits.max_batch_prefill_tokens == 8191
    with pytest.raises(ConfigError, match=re.escape("`max_batch_prefill_tokens` must be >= `max_input_tokens`")):
        _derive(ServerConfig(max_batch_prefill_tokens=1000), constraints=constraints)


@settings(max_examples=300, deadline=None, database=None)
@given(
    flags=st.fixed_dictionaries({name: st.none() | st.integers(1, 20_000) for name in (
        "max_input_tokens", "max_total_tokens", "max_batch_prefill_tokens", "max_batch_total_tokens")}),
    max_position_embeddings=st.integers(2, 16_384),
    model_max_length=st.none() | st.integers(2, 16_384) | st.just(_HUGE_MODEL_MAX_LENGTH),
    free_blocks=st.integers(0, 3_000),
    block_size=st.sampled_from([1, 16, 64]),
    chunked=st.booleans(),
)
def test_derived_limits_are_consistent(flags, max_position_embeddings, model_max_length, free_blocks, block_size,
                                       chunked):
    try:
        config = ServerConfig(**flags)
        num_blocks = num_kv_blocks(config, free_blocks * 1000 * 10 // 9 + 10, 1000, block_size, 0)
        limits = _derive(config, max_position_embeddings, model_max_length, num_blocks, block_size,
                         ShapeConstraints(supports_chunked_prefill=chunked))
    except ConfigError:
        return
    assert limits.max_input_tokens < limits.max_total_tokens <= limits.max_batch_total_tokens
    assert limits.max_batch_prefill_tokens <= limits.max_batch_total_tokens
    assert limits.max_batch_total_tokens <= (limits.num_blocks - 1) * block_size, "more tokens than KV slots"
    if flags["max_total_tokens"] is None:
        assert limits.max_total_tokens <= max_position_embeddings
    if not chunked:
        assert limits.max_batch_prefill_tokens >= limits.max_input_tokens
    for name, value in flags.items():
        if value is not None:
            assert getattr(limits, name) == value


# --- start-up memory: the KV budget, the step check, the speed-derived prefill default -------------------

def test_default_budget_caps_only_a_derived_cache():
    assert num_kv_blocks(ServerConfig(), 10**9, 1_000, 16, 0, default_budget_bytes=50_000) == 50
    assert num_kv_blocks(ServerConfig(), 10**9, 1_000, 16, 0, default_budget_bytes=None) == 900_000
    # One request of an explicit --max-total-tokens always fits the default budget (memory permitting).
    assert num_kv_blocks(ServerConfig(max_total_tokens=1600), 10**9, 1_000, 16, 0, default_budget_bytes=50_000) == 101
    assert num_kv_blocks(ServerConfig(max_total_tokens=160), 10**9, 1_000, 16, 0, default_budget_bytes=50_000) == 50
    # An explicit --max-batch-total-tokens may pass the backend's default budget, up to the memory.
    assert num_kv_blocks(ServerConfig(max_batch_total_tokens=16_000), 10**9, 1_000, 16, 0,
                         default_budget_bytes=50_000) == 1001


def test_kv_cache_gib_caps_the_cache_and_replaces_the_default_budget():
    config = ServerConfig(kv_cache_gib=1.0)
    assert num_kv_blocks(config, 10**12, 2**20, 16, 0, default_budget_bytes=4 * 2**30) == 1024
    assert num_kv_blocks(config, 10**12, 2**20, 16, 0, default_budget_bytes=2**20 * 10) == 1024
    assert num_kv_blocks(config, 2**30, 2**20, 16, 0) == int(2**30 * 0.9) // 2**20  # the memory still caps it
    with pytest.raises(ConfigError, match=r"Not enough memory to handle `max_batch_total_tokens=32768`"):
        num_kv_blocks(ServerConfig(kv_cache_gib=1.0, max_batch_total_tokens=32768), 10**12, 2**20, 16, 0)


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_config_rejects_a_non_positive_kv_budget(value):
    with pytest.raises(ConfigError, match=f"`kv_cache_gib` must be > 0. Given: {value}"):
        ServerConfig(kv_cache_gib=value)


def test_a_step_that_cannot_fit_fails_with_tgis_warmup_message():
    check_step_fits(ServerConfig(), 1_000_000, 900_000, 4096)  # 90% of the reported memory may be used
    with pytest.raises(ConfigError, match=re.escape(
            "Not enough memory to handle 4096 prefill tokens. You need to decrease `--max-batch-prefill-tokens`")):
        check_step_fits(ServerConfig(), 1_000_000, 900_001, 4096)
    with pytest.raises(ConfigError, match="4096 prefill tokens"):
        check_step_fits(ServerConfig(cuda_memory_fraction=0.5), 1_000_000, 500_000, 4096)


@pytest.mark.parametrize("tokens_per_s, step_s, expected", [
    (130.0, 1.0, 128),  # 130 tokens in one second, rounded down to whole blocks of 16
    (82.0, 2.0, 160),
    (21.0, 1.0, MIN_DERIVED_PREFILL_TOKENS),  # a slow CPU still gets steps big enough to amortize overhead
    (50_000.0, 1.0, DEFAULT_MAX_BATCH_PREFILL_TOKENS),  # a fast machine never goes past TGI's default
])
def test_prefill_default_follows_the_measured_speed(tokens_per_s, step_s, expected):
    assert prefill_tokens_for_speed(tokens_per_s, step_s) == expected


def test_derived_prefill_default_is_used_when_the_flag_is_unset():
    assert _derive(default_max_batch_prefill_tokens=128).max_batch_prefill_tokens == 128
    assert _derive(ServerConfig(max_batch_prefill_tokens=300),
                   default_max_batch_prefill_tokens=128).max_batch_prefill_tokens == 300


def test_context_bound_is_the_smallest_length_limit_known_before_sizing():
    model = _model(max_position_embeddings=4096)
    assert max_context_bound(ServerConfig(), model, None, None) == 4096
    assert max_context_bound(ServerConfig(), model, 2048, None) == 2048
    assert max_context_bound(ServerConfig(), model, _HUGE_MODEL_MAX_LENGTH, None) == 4096
    assert max_context_bound(ServerConfig(max_total_tokens=1000), model, None, None) == 1000
    assert max_context_bound(ServerConfig(max_batch_total_tokens=800), model, None, None) == 800
    assert max_context_bound(ServerConfig(), model, None, ShapeConstraints(max_tokens_per_sequence=512)) == 512
