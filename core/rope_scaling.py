"""RoPE scaling as served: the checkpoint's, or what TGI's `--rope-scaling` / `--rope-factor` ask for.

TGI's semantics (its launcher and `layers/rotary.py::_get_rope_config`): when either flag is given
they replace the checkpoint's rope scaling whole; `--rope-factor` alone means linear scaling by it,
`--rope-scaling` alone means factor 1.0 (a no-op for linear; for dynamic NTK, pure NTK-aware
stretching). tgserve applies linear scaling from the flags as transformers does (TGI's flash models
ignore it, a TGI bug). The checkpoint's own `rope_scaling` (Qwen2's model cards add YaRN for inputs
past 32k tokens) needs no flag.

The positions also bound `--max-total-tokens`: past what the model's rotary covers (see
`ModelConfig.max_context_tokens`) tgserve refuses at start, where TGI would serve positions the model
never saw; the default limits stay at `max_position_embeddings`, as TGI's do.
"""
from __future__ import annotations

import dataclasses
import logging
import math

from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.layers.rope_frequencies import ROPE_TYPES
from tgserve.core.model_config import ModelConfig, normalize_rope_scaling

log = logging.getLogger(__name__)

_NEEDS_FACTOR = ("linear", "dynamic", "yarn", "llama3")


def rope_from_flags(rope_scaling: str | None, rope_factor: float | None) -> dict | None:
    """The rope dict the two flags describe, None when neither is given (TGI's launcher table)."""
    if rope_scaling is None and rope_factor is None:
        return None
    return {"rope_type": rope_scaling or "linear", "factor": 1.0 if rope_factor is None else float(rope_factor)}


def serving_model_config(model: ModelConfig, config: ServerConfig) -> ModelConfig:
    """`model` with the rope scaling the server runs and its rotary tables sized to the longest sequence served.

    Called once at start-up, before the model is built. Raises ConfigError for a rope type tgserve
    does not compute, a scaling without a usable factor, or a `--max-total-tokens` past the positions
    the model covers.
    """
    scaling = model.rope_scaling
    flags = rope_from_flags(config.rope_scaling, config.rope_factor)
    if flags is not None:
        if scaling is not None:
            log.warning("--rope-scaling %s --rope-factor %s replace the checkpoint's %s rope scaling",
                        flags["rope_type"], flags["factor"], scaling["rope_type"])
        scaling = normalize_rope_scaling(flags, model.max_position_embeddings, None)
    _check_scaling(scaling)
    served = dataclasses.replace(model, rope_scaling=scaling)
    context, max_total = served.max_context_tokens, config.max_total_tokens
    if max_total is not None and context is not None and max_total > context:
        raise ConfigError(f"`max_total_tokens`({max_total}) must be <= {context}, the positions this model covers "
                          f"({_describe(served)}). {_stretch_hint(served, max_total)}")
    if max_total is None and (context is None or context > model.max_position_embeddings):
        log.info("Positions reach past `max_position_embeddings` (%s); as TGI, the default limits stay at %d. "
                 "Serve longer requests with `--max-total-tokens N --max-input-tokens N-1`",
                 _describe(served), model.max_position_embeddings)
    if scaling is not None:
        log.info("RoPE scaling: %s", _describe(served))
    if max_total is not None and max_total > model.max_position_embeddings:
        return dataclasses.replace(served, max_sequence_tokens=max_total)
    return served


def _check_scaling(scaling: dict | None) -> None:
    if scaling is None:
        return
    rope_type = scaling["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope scaling type '{rope_type}' in config.json is not supported "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    factor = scaling.get("factor")
    is_usable = isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0
    if rope_type in _NEEDS_FACTOR and not is_usable:
        raise ConfigError(f"rope scaling '{rope_type}' in config.json needs a positive number `factor`. Given: {factor}")


def _stretch_hint(model: ModelConfig, max_total: int) -> str:
    if model.rope_scaling is None:
        return (f"Stretch them with `--rope-scaling dynamic` or `--rope-factor "
                f"{math.ceil(max_total / model.max_position_embeddings)}`, or add YaRN to config.json's "
                "`rope_scaling` as Qwen2's model cards do")
    return "Decrease `--max-total-tokens`, or raise the rope scaling `factor` (`--rope-factor` replaces it by linear)"


def _describe(model: ModelConfig) -> str:
    scaling = model.rope_scaling
    if scaling is None:
        return f"`max_position_embeddings` {model.max_position_embeddings}, no rope scaling"
    text = f"{scaling['rope_type']}, factor {scaling['factor']}"
    if scaling["rope_type"] in ("yarn", "llama3"):
        text += f" over `original_max_position_embeddings` {scaling['original_max_position_embeddings']}"
    else:
        text += f" over `max_position_embeddings` {model.max_position_embeddings}"
    context = model.max_context_tokens
    return text + (": any length" if context is None else f": {context} tokens")
