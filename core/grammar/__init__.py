"""Structured generation: requests whose output must follow a JSON schema or a regex (TGI's `grammar`).

`spec` holds what a request asks for (`GrammarSpec`) and the error a bad grammar raises
(`GrammarError`, a 422); `vocabulary` builds llguidance's view of the tokenizer once per server;
`compiler` compiles each grammar once, off the engine thread and within a time limit, into a
`CompiledGrammar` whose `new_matcher()` follows one request token by token.
"""
from __future__ import annotations

from tgserve.core.grammar.compiler import CompiledGrammar, GrammarCompiler, compile_grammar
from tgserve.core.grammar.spec import GrammarError, GrammarSpec
from tgserve.core.grammar.vocabulary import grammar_tokenizer_for, make_grammar_tokenizer

__all__ = ["CompiledGrammar", "GrammarCompiler", "GrammarError", "GrammarSpec", "compile_grammar",
           "grammar_tokenizer_for", "make_grammar_tokenizer"]
