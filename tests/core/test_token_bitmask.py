"""Packed allowed-token masks: the layout is llguidance's (oracle: the bytes its matcher computes, and
numpy's little-endian packbits), and applying them touches only the rows they belong to."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tgserve.checkpoints.demo_tokenizer import IM_END, build_demo_tokenizer, special_token_ids
from tgserve.core.grammar import GrammarSpec, compile_grammar, make_grammar_tokenizer
from tgserve.core.token_bitmask import mask_disallowed, num_words, pack_allowed, unpack_allowed


@pytest.mark.parametrize("vocab_size", [1, 31, 32, 33, 100, 2048])
def test_pack_is_numpy_little_endian_packbits_and_unpack_inverts_it(vocab_size):
    allowed = torch.rand(3, vocab_size, generator=torch.Generator().manual_seed(vocab_size)) < 0.4
    packed = pack_allowed(allowed)
    assert packed.shape == (3, num_words(vocab_size)) and packed.dtype == torch.int32
    expected = np.packbits(allowed.numpy(), axis=1, bitorder="little")
    expected = np.pad(expected, ((0, 0), (0, 4 * num_words(vocab_size) - expected.shape[1]))).view(np.int32)
    assert torch.equal(packed, torch.from_numpy(expected))
    assert torch.equal(unpack_allowed(packed, vocab_size), allowed)


def test_unpacking_llguidance_masks_gives_the_ids_it_allows():
    tokenizer = build_demo_tokenizer()
    eos = special_token_ids(tokenizer)[IM_END]
    compiled = compile_grammar(make_grammar_tokenizer(tokenizer.to_str(), 2048, [eos]), GrammarSpec.regex("(cat|dog)s?"))
    matcher = compiled.new_matcher()
    matcher.consume_tokens(tokenizer.encode("cat").ids)
    bits = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32).unsqueeze(0)
    allowed = set(torch.nonzero(unpack_allowed(bits, 2048)[0]).flatten().tolist())
    assert eos in allowed and allowed - {eos}
    assert all(tokenizer.decode([token]) == "s" for token in allowed - {eos})


def test_mask_disallowed_touches_only_its_rows():
    logits = torch.randn(4, 70, generator=torch.Generator().manual_seed(0))
    allowed = torch.rand(2, 70, generator=torch.Generator().manual_seed(1)) < 0.5
    out = mask_disallowed(logits, pack_allowed(allowed), torch.tensor([3, 1]))
    assert torch.equal(out[[0, 2]], logits[[0, 2]])
    for mask_row, row in ((0, 3), (1, 1)):
        assert torch.equal(out[row], logits[row].masked_fill(~allowed[mask_row], float("-inf")))
    every_row = mask_disallowed(logits[:2], pack_allowed(allowed), None)
    assert torch.equal(every_row, logits[:2].masked_fill(~allowed, float("-inf")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masking_keeps_allowed_logits_exactly_even_at_the_extremes(dtype):
    """The masking is arithmetic (a minimum with +-inf bounds), so an allowed id's logit must pass
    unchanged whatever it is: huge, tiny, -inf already (a penalty or a filter), NaN stays NaN."""
    extremes = [3.0e38, -3.0e38, 1e-30, -0.0, float("-inf"), float("inf")]
    logits = torch.tensor([extremes * 2], dtype=dtype)
    allowed = torch.tensor([[True] * 6 + [False] * 6])
    out = mask_disallowed(logits, pack_allowed(allowed), None)
    assert out.dtype == dtype
    assert torch.equal(out[0, :6], logits[0, :6])
    assert torch.equal(out[0, 6:], torch.full((6,), float("-inf"), dtype=dtype))
    nan = mask_disallowed(torch.tensor([[float("nan")]], dtype=dtype), pack_allowed(torch.tensor([[True]])), None)
    assert torch.isnan(nan).all()
