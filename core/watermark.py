"""The Kirchenbauer et al. (2023) watermark, as TGI's `utils/watermark.py`, vectorised over the batch.

For a watermarked row, the previous token splits the vocabulary into a "green" share `gamma` and a
"red" rest, and `delta` is added to the green logits before every other logits processor (TGI's
order). TGI seeds a `torch.Generator` with `hash_key * prev_token` and takes the first
`gamma * vocab` ids of a `randperm`; here a counter-based hash of (`hash_key * prev_token`,
vocabulary id) compared with `gamma` decides, so a step needs neither a generator per row nor a
Python loop over the batch. Each id is green with probability `gamma` (the greenlist size is
binomial around `gamma * vocab`, not exact), which is all detection relies on; greenness does not
depend on the width of the logits, so a detector needs only the token ids.

This is a deliberate difference from TGI (listed in the README): TGI's detector does not recognise
tgserve's watermark, nor the reverse. Why: TGI's greenlist costs a host-side loop per row and step
(seed a generator, `randperm` the whole vocabulary), and `randperm` output depends on the generator's
device and torch version, so TGI's own greenlists are not a stable, device-independent function to
match; reproducing them vectorised would mean reimplementing torch's randperm per backend. The hash
here is fully specified by this file (`is_green`, with `mix32` from core/sampling.py), and
tests/core/test_watermark.py checks it against a pure-Python reimplementation.

Detection (`detect`) counts green tokens in a text's ids and returns the paper's z-score
(num_green - gamma * T) / sqrt(T * gamma * (1 - gamma)): near 0 for text written without the
watermark, large (4 and more) for watermarked text of a few dozen tokens or more.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from tgserve.core.sampling import mix32

DEFAULT_GAMMA = 0.5  # TGI's WATERMARK_GAMMA default (--watermark-gamma)
DEFAULT_DELTA = 2.0  # TGI's WATERMARK_DELTA default (--watermark-delta)
HASH_KEY = 15485863  # TGI's hash key (the millionth prime): the greenlist is seeded by HASH_KEY * prev
_MASK32 = 0xFFFFFFFF
_SALT = 0x7F4A7C15  # keeps these bits unrelated to the sampler's Gumbel noise, which hashes ids too


@dataclass(slots=True)
class WatermarkBatch:
    """Watermark inputs of one step on the device, S = sampling sequences (built by the runner).

    The runner builds one only when some row of the step asked for the watermark (the host-side
    `any_watermark`), so steps without it pay nothing.
    """

    prev_ids: torch.Tensor  # int64 [S], the last known token of each row (the one being continued)
    is_watermarked: torch.Tensor  # bool [S]
    gamma: float  # host float in (0, 1), the green share of the vocabulary
    delta: float  # host float, logit bias added to green ids

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: float [S, vocab] -> logits with `delta` added to each watermarked row's green ids."""
        ids = torch.arange(logits.shape[1], device=logits.device, dtype=torch.int64)
        green = is_green(self.prev_ids.unsqueeze(1), ids.unsqueeze(0), self.gamma)
        green &= self.is_watermarked.unsqueeze(1)
        return logits + green.to(logits.dtype) * self.delta


def is_green(prev_ids: torch.Tensor, token_ids: torch.Tensor, gamma: float) -> torch.Tensor:
    """Whether each token id is green after its previous token; int64 inputs broadcast together.

    prev_ids [N, 1] with token_ids [1, vocab] gives a greenlist per row; two [T] tensors give the
    greenness of each token of a text after its predecessor. Returns bool of the broadcast shape.
    """
    row_key = mix32((prev_ids * HASH_KEY) & _MASK32)
    bits = mix32(((mix32(token_ids) ^ row_key) + _SALT) & _MASK32)  # uniform in [0, 2**32)
    return bits < int(gamma * (1 << 32))


@dataclass(slots=True, frozen=True)
class WatermarkScore:
    """What `detect` found in one text."""

    num_tokens_scored: int  # tokens that have a predecessor (all but the first id given)
    num_green_tokens: int
    z_score: float  # standard deviations above what unwatermarked text would show


def detect(token_ids: Sequence[int], gamma: float = DEFAULT_GAMMA) -> WatermarkScore:
    """Score `token_ids` (the last prompt token, then the generated ids) for the watermark.

    The first id only seeds the greenlist of the second; every later id is scored.
    """
    ids = torch.tensor(list(token_ids), dtype=torch.int64)
    num_scored = max(len(ids) - 1, 0)
    if num_scored == 0:
        return WatermarkScore(0, 0, 0.0)
    num_green = int(is_green(ids[:-1], ids[1:], gamma).sum())
    expected = gamma * num_scored
    z_score = (num_green - expected) / math.sqrt(num_scored * gamma * (1.0 - gamma))
    return WatermarkScore(num_scored, num_green, z_score)
