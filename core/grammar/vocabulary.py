"""The tokenizer as the grammar engine sees it: llguidance's token trie, built once per server.

llguidance reads the tokenizers-library JSON of a fast tokenizer and builds a byte trie of every
token. `tgserve benchmark grammar` measured that build at 0.06 s (demo, 2k tokens), 0.43 s (SmolLM2,
49k) and 2.1 s (151k, Qwen2's size) on a shared 2-core machine: a start-up cost, never a per-request one.
"""
from __future__ import annotations

from collections.abc import Sequence
from copy import copy

import llguidance


def make_grammar_tokenizer(tokenizer_json: str, num_logits: int, eos_token_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's tokenizer from a tokenizers-library JSON serialization.

    num_logits: the model's vocab_size, the width of a logits row (Qwen2 pads past the tokenizer);
        ids past the tokenizer are never allowed.
    eos_token_ids: the ids that end generation; a grammar allows them once its text is complete.
    """
    if not eos_token_ids:
        raise ValueError("a grammar tokenizer needs at least one eos token id")
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=num_logits, eos_token=list(eos_token_ids))


def grammar_tokenizer_for(hf_tokenizer, num_logits: int, eos_token_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for a transformers fast tokenizer (what `core.tokenizer.Tokenizer.hf` holds).

    The backend tokenizer is copied with padding and truncation off: a grammar sees whole texts.
    """
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("structured generation needs a fast (tokenizers-library) tokenizer; "
                         f"{type(hf_tokenizer).__name__} is not one")
    backend = copy(backend)
    backend.no_padding()
    backend.no_truncation()
    return make_grammar_tokenizer(backend.to_str(), num_logits, eos_token_ids)
