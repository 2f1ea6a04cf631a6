"""RoPE's inverse frequencies for each `rope_type`, computed as transformers' `modeling_rope_utils` does.

Each function returns float32 `inv_freq` [head_dim // 2] and the attention factor that multiplies
cos and sin (so a query-key score by its square): YaRN's mscale, 1.0 for every other type. The
expressions follow transformers' operation for operation, so float32 tables come out identical.
`scaling` is the rope dict `ModelConfig` normalised: `rope_type`, `factor`, and for the types that
need it `original_max_position_embeddings` (for `dynamic`, the checkpoint's `max_position_embeddings`).
"""
from __future__ import annotations

import math

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


class UnsupportedRopeType(ValueError):
    """The checkpoint (or a flag) asks for a rope_type tgserve does not compute."""


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None,
                     num_positions: int) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [head_dim // 2], attention factor) for positions 0 .. num_positions - 1."""
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return _default(head_dim, theta), 1.0
    if rope_type == "linear":
        return _default(head_dim, theta) / float(scaling["factor"]), 1.0
    if rope_type == "dynamic":
        return _dynamic_ntk(head_dim, theta, scaling, num_positions), 1.0
    if rope_type == "yarn":
        return _yarn(head_dim, theta, scaling)
    if rope_type == "llama3":
        return _llama3(_default(head_dim, theta), scaling), 1.0
    raise UnsupportedRopeType(f"unsupported rope_type '{rope_type}' (supported: {', '.join(ROPE_TYPES)})")


def _default(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _dynamic_ntk(head_dim: int, theta: float, scaling: dict, num_positions: int) -> torch.Tensor:
    """Dynamic NTK: the base grows with the sequence length once it passes the original window.

    transformers recomputes the frequencies in every forward from that forward's longest position
    and keeps the keys already in its cache as they were rotated. A paged engine cannot do that: a
    step mixes sequences of every length, and each one's cached keys would then have been rotated
    with other frequencies than its new queries. tgserve fixes the base once, for the longest
    sequence it serves (`num_positions`: the server's `--max-total-tokens` when that passes
    `max_position_embeddings`), which is where TGI's grow-only table settles after its warmup at
    `max_total_tokens`. So every request sees one consistent rotation; a server whose limits stay
    inside the original window runs plain RoPE, exactly as transformers does for such sequences; and
    a sequence `num_positions` long gets transformers' frequencies for that length computed in one pass.
    """
    factor, original = float(scaling["factor"]), scaling["original_max_position_embeddings"]
    seq_len = max(num_positions, original)
    base = theta * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return _default(head_dim, base)


def _yarn(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): high frequencies kept, low ones divided by `factor`, a linear ramp
    between the `beta_fast` and `beta_slow` rotation counts, and cos/sin scaled by the attention factor."""
    factor, original = float(scaling["factor"]), scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32  # transformers' defaults, also for an explicit 0 or null
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        """The dimension whose wavelength turns `num_rotations` times over the original window."""
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(dtype=torch.float) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor, attention_factor


def _yarn_mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths divided by `factor`, smoothly."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(is_medium, smoothed, scaled)
