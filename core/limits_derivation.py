"""How start-up turns flags, the model and the memory into `RuntimeLimits`, as TGI derives them."""
from __future__ import annotations

from tgserve.core.config import ConfigError, ServerConfig, check_token_limits
from tgserve.core.limits import RuntimeLimits
from tgserve.core.model_config import ModelConfig
from tgserve.core.shape_constraints import ShapeConstraints

DEFAULT_MAX_BATCH_PREFILL_TOKENS = 4096  # TGI's fallback when it cannot compute an optimum
WIGGLE_ROOM = 0.9  # share of the reported free memory the KV cache may take (TGI_WIGGLE_ROOM)
# A prefill default derived from a measured speed is at least this: smaller steps would spend more
# on per-step overhead than on tokens (and cap the decode batch, which shares the step budget).
MIN_DERIVED_PREFILL_TOKENS = 64
DERIVED_PREFILL_ALIGN_TOKENS = 16  # derived defaults are rounded down to a multiple of this
_NO_LENGTH_LIMIT = 10**9  # tokenizers without a limit report model_max_length as ~1e30


def usable_bytes(config: ServerConfig, free_bytes: int) -> int:
    """The share of the backend's free-memory answer that the step and the KV cache may take."""
    return int(free_bytes * config.cuda_memory_fraction * WIGGLE_ROOM)


def check_step_fits(config: ServerConfig, free_bytes: int, step_bytes: int, num_prefill_tokens: int) -> None:
    """Fail with TGI's warmup message when one prefill step alone needs more than the memory."""
    if step_bytes > usable_bytes(config, free_bytes):
        raise ConfigError(f"Not enough memory to handle {num_prefill_tokens} prefill tokens. "
                          "You need to decrease `--max-batch-prefill-tokens`")


def prefill_tokens_for_speed(tokens_per_s: float, step_s: float) -> int:
    """The default `max_batch_prefill_tokens` for a measured prefill speed: the tokens `step_s` computes.

    TGI divides a GPU's peak FLOP/s by the model's FLOPs per token: one second of peak compute.
    Here the speed is measured, not a datasheet's peak. Clamped to [MIN_DERIVED_PREFILL_TOKENS,
    DEFAULT_MAX_BATCH_PREFILL_TOKENS] and rounded down to a multiple of DERIVED_PREFILL_ALIGN_TOKENS.
    """
    tokens = int(tokens_per_s * step_s) // DERIVED_PREFILL_ALIGN_TOKENS * DERIVED_PREFILL_ALIGN_TOKENS
    return max(MIN_DERIVED_PREFILL_TOKENS, min(DEFAULT_MAX_BATCH_PREFILL_TOKENS, tokens))


def max_context_bound(config: ServerConfig, model: ModelConfig, model_max_length: int | None,
                      constraints: ShapeConstraints | None) -> int:
    """The longest a sequence can be before the KV cache is sized (`max_total_tokens` is at most this)."""
    caps = _length_caps(model, model_max_length, constraints or ShapeConstraints())
    caps += [c for c in (config.max_total_tokens, config.max_batch_total_tokens) if c]
    return min(caps)


def num_kv_blocks(config: ServerConfig, free_bytes: int, bytes_per_block: int, block_size: int,
                  activation_bytes: int, default_budget_bytes: int | None = None) -> int:
    """Blocks to allocate: what `--max-batch-total-tokens` asks for, else what the memory holds.

    The cache never takes more than `--kv-cache-gib`; without that flag, a size the core derives
    stops at `default_budget_bytes` (the backend's default budget; None: no cap beyond memory) or
    at one request of `--max-total-tokens`, whichever is more, while an explicit
    `--max-batch-total-tokens` may go past the default up to the memory.
    """
    affordable = max(usable_bytes(config, free_bytes) - activation_bytes, 0) // bytes_per_block
    if config.kv_cache_gib is not None:
        affordable = min(affordable, int(config.kv_cache_gib * 2**30) // bytes_per_block)
    if config.max_batch_total_tokens is not None:
        wanted = -(-config.max_batch_total_tokens // block_size) + 1  # + the reserved block 0
        if wanted > affordable:
            raise ConfigError(f"Not enough memory to handle `max_batch_total_tokens={config.max_batch_total_tokens}`: "
                              f"the KV cache fits {max(affordable - 1, 0) * block_size} tokens. "
                              "You need to decrease `--max-batch-total-tokens`")
        return wanted
    if config.kv_cache_gib is None and default_budget_bytes is not None:
        default_blocks = default_budget_bytes // bytes_per_block
        if config.max_total_tokens is not None:  # the default budget always holds one request of the asked length
            default_blocks = max(default_blocks, -(-config.max_total_tokens // block_size) + 1)
        affordable = min(affordable, default_blocks)
    if affordable < 2:
        raise ConfigError("Not enough memory for the KV cache: you need to decrease `--max-batch-prefill-tokens` "
                          "or use a smaller model or dtype")
    return affordable


def derive_limits(config: ServerConfig, model: ModelConfig, model_max_length: int | None, num_blocks: int,
                  block_size: int, constraints: ShapeConstraints | None,
                  default_max_batch_prefill_tokens: int = DEFAULT_MAX_BATCH_PREFILL_TOKENS) -> RuntimeLimits:
    """Fill every limit the user left unset and check the whole set with TGI's messages.

    default_max_batch_prefill_tokens: the prefill budget when the flag is unset (TGI's 4096, or
    what the measured speed gives: `prefill_tokens_for_speed`).
    """
    constraints = constraints or ShapeConstraints()
    capacity = (num_blocks - 1) * block_size
    max_batch_total = config.max_batch_total_tokens or capacity
    max_total = config.max_total_tokens or min([max_batch_total, *_length_caps(model, model_max_length, constraints)])
    if max_total > max_batch_total:
        raise ConfigError(f"Not enough memory to handle `max_total_tokens={max_total}` "
                          f"(the KV cache holds {max_batch_total} tokens). You need to decrease `--max-total-tokens`")
    max_input = config.max_input_tokens or max_total - 1
    max_prefill = config.max_batch_prefill_tokens or min(
        max(default_max_batch_prefill_tokens, 0 if constraints.supports_chunked_prefill else max_input),
        model.max_position_embeddings, max_batch_total)
    check_token_limits(max_input, max_total, max_prefill, max_batch_total)
    if not constraints.supports_chunked_prefill and max_prefill < max_input:
        raise ConfigError("`max_batch_prefill_tokens` must be >= `max_input_tokens`")
    batch_caps = [c for c in (config.max_batch_size, constraints.max_batch_size) if c]
    return RuntimeLimits(max_input_tokens=max_input, max_total_tokens=max_total,
                         max_batch_prefill_tokens=max_prefill, max_batch_total_tokens=max_batch_total,
                         max_batch_size=min(batch_caps) if batch_caps else None,
                         num_blocks=num_blocks, block_size=block_size)


def _length_caps(model: ModelConfig, model_max_length: int | None, constraints: ShapeConstraints) -> list[int]:
    """What bounds one sequence's length apart from the flags and the cache: positions, tokenizer, shapes."""
    caps = [model.max_position_embeddings]
    if model_max_length and model_max_length < _NO_LENGTH_LIMIT:
        caps.append(model_max_length)
    if constraints.max_tokens_per_sequence:
        caps.append(constraints.max_tokens_per_sequence)
    return caps
