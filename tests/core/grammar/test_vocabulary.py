"""The grammar tokenizer built from a transformers fast tokenizer, as the server holds it
(`core.tokenizer.Tokenizer.hf`): its ids are the model's, and slow tokenizers are refused by name."""
from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from tgserve.checkpoints.demo_tokenizer import IM_END, build_demo_tokenizer, special_token_ids
from tgserve.core.grammar import GrammarSpec, compile_grammar, grammar_tokenizer_for, make_grammar_tokenizer


def test_a_fast_tokenizers_grammar_follows_its_own_ids():
    demo = build_demo_tokenizer()
    eos_id = special_token_ids(demo)[IM_END]
    hf = PreTrainedTokenizerFast(tokenizer_object=demo, eos_token=IM_END)
    hf.backend_tokenizer.enable_truncation(4)  # the grammar's copy drops it; the server's tokenizer keeps it
    compiled = compile_grammar(grammar_tokenizer_for(hf, 2048, [eos_id]), GrammarSpec.regex("(ab|cd)+ done"))
    assert hf.backend_tokenizer.truncation["max_length"] == 4
    matcher = compiled.new_matcher()
    text = "abcdab done"
    assert matcher.consume_tokens(demo.encode(text).ids) and matcher.is_accepting()
    assert matcher.compute_bitmask() and matcher.consume_token(eos_id)


def test_slow_tokenizers_and_missing_eos_are_refused():
    class SlowTokenizer:  # what a sentencepiece-only (non-fast) tokenizer looks like here: no backend_tokenizer
        pass

    with pytest.raises(ValueError, match="fast"):
        grammar_tokenizer_for(SlowTokenizer(), 2048, [0])
    with pytest.raises(ValueError, match="eos"):
        make_grammar_tokenizer(build_demo_tokenizer().to_str(), 2048, [])
