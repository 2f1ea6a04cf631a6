"""How start-up turns flags, the model and the memory into `RuntimeLimits`, as TGI derives them."""
from __future__ import annotations

from tgserve.core.config import ConfigError, ServerConfig, check_token_limits
from tgserve.core.limits import RuntimeLimits
from tgserve.core.model_config import ModelConfig
from tgserve.core.shape_constraints import ShapeConstraints

DEFAULT_MAX_BATCH_PREFILL_TOKENS = 4096  # TGI's fallback when it cannot compute an optimum
WIGGLE_ROOM = 0.9  # share of the reported free memory the KV cache may take (TGI_WIGGLE_ROOM)


def num_kv_blocks(config: ServerConfig, free_bytes: int, bytes_per_block: int, block_size: int,
                  activation_bytes: int) -> int:
    """Blocks to allocate: what `--max-batch-total-tokens` asks for, else what the memory holds."""
    budget = int(free_bytes * config.cuda_memory_fraction * WIGGLE_ROOM) - activation_bytes
    affordable = max(budget, 0) // bytes_per_block
    if config.max_batch_total_tokens is not None:
        wanted = -(-config.max_batch_total_tokens // block_size) + 1  # + the reserved block 0
        if wanted > affordable:
            raise ConfigError(f"Not enough memory to handle `max_batch_total_tokens={config.max_batch_total_tokens}`: "
                              f"the KV cache fits {max(affordable - 1, 0) * block_size} tokens. "
                              "You need to decrease `--max-batch-total-tokens`")
        return wanted
    if affordable < 2:
        raise ConfigError("Not enough memory for the KV cache: you need to decrease `--max-batch-prefill-tokens` "
                          "or use a smaller model or dtype")
    return affordable


def derive_limits(config: ServerConfig, model: ModelConfig, model_max_length: int | None, num_blocks: int,
                  block_size: int, constraints: ShapeConstraints | None) -> RuntimeLimits:
    """Fill every limit the user left unset and check the whole set with TGI's messages."""
    constraints = constraints or ShapeConstraints()
    capacity = (num_blocks - 1) * block_size
    max_batch_total = config.max_batch_total_tokens or capacity
    caps = [max_batch_total, model.max_position_embeddings]
    if model_max_length and model_max_length < 10**9:
        caps.append(model_max_length)
    if constraints.max_tokens_per_sequence:
        caps.append(constraints.max_tokens_per_sequence)
    max_total = config.max_total_tokens or min(caps)
    if max_total > max_batch_total:
        raise ConfigError(f"Not enough memory to handle `max_total_tokens={max_total}` "
                          f"(the KV cache holds {max_batch_total} tokens). You need to decrease `--max-total-tokens`")
    max_input = config.max_input_tokens or max_total - 1
    max_prefill = config.max_batch_prefill_tokens or min(
        max(DEFAULT_MAX_BATCH_PREFILL_TOKENS, 0 if constraints.supports_chunked_prefill else max_input),
        model.max_position_embeddings, max_batch_total)
    check_token_limits(max_input, max_total, max_prefill, max_batch_total)
    if not constraints.supports_chunked_prefill and max_prefill < max_input:
        raise ConfigError("`max_batch_prefill_tokens` must be >= `max_input_tokens`")
    batch_caps = [c for c in (config.max_batch_size, constraints.max_batch_size) if c]
    return RuntimeLimits(max_input_tokens=max_input, max_total_tokens=max_total,
                         max_batch_prefill_tokens=max_prefill, max_batch_total_tokens=max_batch_total,
                         max_batch_size=min(batch_caps) if batch_caps else None,
                         num_blocks=num_blocks, block_size=block_size)
