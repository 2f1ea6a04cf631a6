"""The three grammar libraries issue 15 names, behind one small interface for `tgserve benchmark grammar`.

Each adapter does what a server would: build the tokenizer data once, compile a grammar (JSON schema
or regex) with the library's defaults, make a matcher per request, fill one int32 bitmask row per
constrained request ([rows, ceil(num_logits / 32)], bit set = token allowed) and advance by the
sampled token. `fill_one` fills one row; `fill` takes all constrained rows of a step at once, through the library's batched
call where it has one (xgrammar's BatchGrammarMatcher, llguidance's LLExecutor); outlines-core has
none, so its rows are filled one after another, as a server would have to.
"""
from __future__ import annotations

import importlib
import importlib.metadata

import torch

from tgserve.benchmark.grammar_tokenizers import BenchTokenizer, token_bytes

ENGINE_NAMES = ("xgrammar", "llguidance", "outlines-core")


class GrammarRejected(Exception):
    """The library refused the grammar; the message is the library's own."""


class XGrammarEngine:
    """xgrammar: compiles a pushdown automaton and precomputes per-state token masks at compile time."""

    name = "xgrammar"
    is_batched = True

    def __init__(self, tokenizer: BenchTokenizer, hf_tokenizer, num_threads: int) -> None:
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=tokenizer.num_logits,
                                                       stop_token_ids=[tokenizer.eos_token_id])
        # cache off: every compile in the benchmark is a cold one (a server caches by text on top).
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=num_threads, cache_enabled=False)
        self._batch = xgrammar.BatchGrammarMatcher(max_threads=num_threads)

    def compile(self, kind: str, text: str):
        try:
            return self._compiler.compile_json_schema(text) if kind == "json" else self._compiler.compile_regex(text)
        except RuntimeError as error:  # xgrammar raises RuntimeError with the C++ message for bad input
            raise GrammarRejected(_last_line(str(error))) from None

    def new_matcher(self, compiled):
        return self._xgr.GrammarMatcher(compiled)

    def fill_one(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        if len(matchers) == 1:
            self.fill_one(matchers[0], bitmask, 0)
        else:
            self._batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher, token_id: int) -> bool:
        return bool(matcher.accept_token(token_id))


class LLGuidanceEngine:
    """llguidance: an Earley parser over a lazily built derivative-regex lexer; no token-level precompute."""

    name = "llguidance"
    is_batched = True

    def __init__(self, tokenizer: BenchTokenizer, hf_tokenizer, num_threads: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        from tgserve.core.grammar.compiler import one_line  # the message tgserve's 422 carries

        self._one_line = one_line
        self._llg = llguidance
        self._llg_torch = llguidance.torch
        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=tokenizer.num_logits,
                                                       eos_token=tokenizer.eos_token_id)
        self._executor = llguidance.LLExecutor(num_threads=num_threads)

    def compile(self, kind: str, text: str):
        matcher_class = self._llg.LLMatcher
        grammar = (matcher_class.grammar_from_json_schema(text) if kind == "json"
                   else matcher_class.grammar_from_regex(text))
        template = matcher_class(self._tokenizer, grammar, log_level=0)
        if template.is_error():  # llguidance reports bad grammars as an error state, never an exception
            raise GrammarRejected(self._one_line(template.get_error()))
        return template

    def new_matcher(self, compiled):
        return compiled.deep_copy()

    def fill_one(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        self._llg_torch.fill_next_token_bitmask(matcher, bitmask, row)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        if len(matchers) == 1:
            self.fill_one(matchers[0], bitmask, 0)
        else:
            self._llg_torch.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matcher, token_id: int) -> bool:
        return bool(matcher.consume_token(token_id))


class OutlinesCoreEngine:
    """outlines-core: JSON schema -> one regex -> a token-level DFA index built in full at compile time."""

    name = "outlines-core"
    is_batched = False

    def __init__(self, tokenizer: BenchTokenizer, hf_tokenizer, num_threads: int) -> None:
        import outlines_core
        from outlines_core import json_schema

        self._oc = outlines_core
        self._build_regex = json_schema.build_regex_from_schema
        mapping, _ = token_bytes(hf_tokenizer)
        mapping.pop(hf_tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id).encode(), None)
        self._vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, mapping)

    def compile(self, kind: str, text: str):
        try:
            regex = self._build_regex(text) if kind == "json" else text
            return self._oc.Index(regex, self._vocabulary)
        except (ValueError, TypeError) as error:
            raise GrammarRejected(_last_line(str(error))) from None

    def new_matcher(self, compiled):
        return self._oc.Guide(compiled)

    def fill_one(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.write_mask_into(bitmask[row].data_ptr(), bitmask.shape[1], 4)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        for row, guide in enumerate(matchers):
            self.fill_one(guide, bitmask, row)

    def accept(self, matcher, token_id: int) -> bool:
        try:
            matcher.advance(token_id, return_tokens=False)
        except ValueError:
            return False
        return True


_ENGINES = {"xgrammar": XGrammarEngine, "llguidance": LLGuidanceEngine, "outlines-core": OutlinesCoreEngine}
_DISTRIBUTIONS = {"xgrammar": "xgrammar", "llguidance": "llguidance", "outlines-core": "outlines-core"}


_MODULES = {"xgrammar": ("xgrammar",), "llguidance": ("llguidance", "llguidance.hf", "llguidance.torch"),
            "outlines-core": ("outlines_core", "outlines_core.json_schema")}


def import_engine(name: str) -> None:
    """Import a library's modules, so that timing `make_engine` times the tokenizer build, not imports
    (llguidance.torch alone pulls in torch.compile's machinery: ~0.8 s)."""
    for module in _MODULES[name]:
        importlib.import_module(module)


def make_engine(name: str, tokenizer: BenchTokenizer, hf_tokenizer, num_threads: int):
    """The adapter for a library in ENGINE_NAMES, its tokenizer data built (the once-per-server cost)."""
    return _ENGINES[name](tokenizer, hf_tokenizer, num_threads)


def engine_version(name: str) -> str | None:
    """The installed version of the library, or None when it is not installed."""
    try:
        return importlib.metadata.version(_DISTRIBUTIONS[name])
    except importlib.metadata.PackageNotFoundError:
        return None


def _last_line(message: str) -> str:
    """xgrammar prefixes its errors with a timestamp and a source position; keep what a user can act on."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else message
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text
