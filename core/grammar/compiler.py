"""Grammar compiles off the engine thread, once per grammar text, within a time limit.

Why llguidance (measured by `tgserve benchmark grammar`; BENCHMARKS.md, issue 15's section): every
valid case compiled cold in 0.4-2 ms on tokenizers of 2k to 151k tokens, where xgrammar took up to
1.5 s (an email regex) and outlines-core up to past 20 s (`{"type": "object"}`); its own limits
(grammar size, lexer fuel, recursion depth) turn a runaway schema into an error within ~0.1 s, where
xgrammar ran past 90 s with no way to stop it in-process; and it is one small wheel with no
dependencies. Its per-step mask is slower than xgrammar's (about 10 against 3 microseconds a row on
SmolLM2's vocabulary), small beside a decoding step.

A compile runs on one of this compiler's threads (llguidance drops the GIL while it builds), never
on the caller's: `submit` returns a future at once, `compile` blocks only its own caller. A timer
started with each compile fails the future with a `GrammarError` once `max_compile_s` has passed;
the library's own limits bound the work the abandoned compile still does. Results and errors are
both cached by `GrammarSpec`, so a grammar that failed (or timed out) fails again at once, not after
another compile.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import torch

from tgserve.core.grammar.spec import GrammarError, GrammarSpec
from tgserve.core.token_bitmask import unpack_allowed

DEFAULT_MAX_COMPILE_S = 5.0  # past this a request gets a 422; valid grammars measured compile in milliseconds
DEFAULT_MAX_CACHED = 256  # grammars (compiled or failed) kept, least recently used dropped first
_FIRST_STEP_TRIES = 4  # allowed ids tried for the first-step check (an EOS among the lowest is skipped)
_KIND_WORDS = {"json": "JSON schema", "regex": "regex"}
# Whitespace a JSON output may put between tokens: one optional space, as TGI's outlines-built JSON
# grammars (outlines' WHITESPACE). llguidance's default allows any run of whitespace, and the demo model
# under it wrote "{" and then newlines until max_new_tokens; a schema's own `x-guidance` still overrides it.
# `oneOf`: llguidance refuses one whose branches it cannot prove exclusive; coerced, it is enforced as
# `anyOf` (as TGI's outlines grammars do), so a schema is accepted, and an output matching two overlapping
# branches is possible.
JSON_DEFAULTS = {"whitespace_pattern": "[ ]?", "coerce_one_of": True}


@dataclass(slots=True, frozen=True)
class CompiledGrammar:
    spec: GrammarSpec  # what was compiled (the cache key)
    grammar: str  # llguidance's grammar definition built from the spec
    template: llguidance.LLMatcher  # in its start state with its first mask computed; only ever copied
    compile_s: float  # wall-clock seconds the compile took, first mask included

    def new_matcher(self) -> llguidance.LLMatcher:
        """A matcher for one request, in the start state: a copy of the template, which shares its
        lexer cache, so the request's first mask is not computed from scratch."""
        return self.template.deep_copy()


class GrammarCompiler:
    """A cache of compiled grammars whose misses compile on a small thread pool, each within a time limit."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, *, max_compile_s: float = DEFAULT_MAX_COMPILE_S,
                 max_cached: int = DEFAULT_MAX_CACHED, num_threads: int = 2,
                 limits: llguidance.LLParserLimits | None = None) -> None:
        """tokenizer: from `core.grammar.vocabulary` (built once per server).
        max_compile_s: wall-clock seconds one compile may take before its requests get a `GrammarError`.
        num_threads: compiles that may run at once (more waits in a queue; queued time is not counted).
        limits: llguidance's own bounds on grammar size and lexer/parser work (None: its defaults)."""
        if max_compile_s <= 0 or max_cached < 1 or num_threads < 1:
            raise ValueError("max_compile_s must be > 0, max_cached and num_threads >= 1")
        self.max_compile_s = max_compile_s
        self._tokenizer = tokenizer
        self._limits = limits
        self._max_cached = max_cached
        self._cache: OrderedDict[GrammarSpec, Future] = OrderedDict()  # oldest use first
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(num_threads, thread_name_prefix="tgserve-grammar")

    def submit(self, spec: GrammarSpec) -> Future:
        """The future of `spec`'s `CompiledGrammar` (or `GrammarError`): the cached one, or a new compile."""
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                return future
            future = Future()
            self._cache[spec] = future
            self._evict()
        self._executor.submit(self._run, spec, future)
        return future

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Block the calling thread until `spec` is compiled; raises `GrammarError` for a bad or slow grammar."""
        return self.submit(spec).result()

    async def compile_async(self, spec: GrammarSpec) -> CompiledGrammar:
        """`compile` for an event loop: the loop keeps serving while the grammar compiles."""
        return await asyncio.wrap_future(self.submit(spec))

    def close(self) -> None:
        """Stop taking compiles; queued ones are cancelled, a running one is left to finish on its own."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _evict(self) -> None:
        finished = [spec for spec, future in self._cache.items() if future.done()]
        for spec in finished[:max(0, len(self._cache) - self._max_cached)]:
            del self._cache[spec]

    def _run(self, spec: GrammarSpec, future: Future) -> None:
        timer = threading.Timer(self.max_compile_s, self._expire, args=(spec, future))
        timer.daemon = True
        timer.start()
        try:
            outcome: CompiledGrammar | BaseException = compile_grammar(self._tokenizer, spec, self._limits)
        except BaseException as error:  # GrammarError for the client; anything else reaches the caller as it is
            outcome = error
        finally:
            timer.cancel()
        with self._lock:
            if future.done():  # the timer failed it first
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _expire(self, spec: GrammarSpec, future: Future) -> None:
        with self._lock:
            if not future.done():
                future.set_exception(GrammarError(
                    f"compiling the {_KIND_WORDS[spec.kind]} took longer than {self.max_compile_s:g} s; "
                    "simplify the grammar"))


def compile_grammar(tokenizer: llguidance.LLTokenizer, spec: GrammarSpec,
                    limits: llguidance.LLParserLimits | None = None) -> CompiledGrammar:
    """Compile `spec` now, on the calling thread: llguidance's grammar, a template matcher, its first mask.

    Raises `GrammarError` naming the problem for an invalid or unsupported grammar, or one past the
    library's limits."""
    start = time.perf_counter()
    matcher_class = llguidance.LLMatcher
    if spec.kind == "json":
        try:
            grammar = matcher_class.grammar_from_json_schema(spec.text, defaults=JSON_DEFAULTS)
        except ValueError as error:  # not JSON, or not an object
            raise GrammarError(f"invalid JSON schema: {one_line(str(error))}") from None
    else:
        grammar = matcher_class.grammar_from_regex(spec.text)
    template = matcher_class(tokenizer, grammar, log_level=0, limits=limits)
    if not template.is_error():
        first_mask = template.compute_bitmask()  # the first mask is the costly one; pay it here, off the engine thread
        if not template.is_error():
            _first_step_check(spec, template, first_mask)
    if template.is_error():
        raise GrammarError(f"invalid {_KIND_WORDS[spec.kind]}: {one_line(template.get_error())}")
    return CompiledGrammar(spec, grammar, template, time.perf_counter() - start)


def _first_step_check(spec: GrammarSpec, template: llguidance.LLMatcher, first_mask: bytes) -> None:
    """Raise `GrammarError` when a first generated token already breaks the matcher.

    A counted repetition too large for llguidance's lexer (`x{1000000}`, `x{1000}{1000}`) compiles and
    masks once, then fails on its first character ("too many expressions constructed"): left to the
    engine, every such request would die on its first token after a mask that stalls the batch for
    ~0.1 s. So a copy of the template takes the lowest id the first mask allows (one that does not end
    the grammar) and computes the mask after it, here, off the engine thread."""
    allowed = unpack_allowed(torch.frombuffer(bytearray(first_mask), dtype=torch.int32).unsqueeze(0),
                             len(first_mask) * 8)[0]
    for token_id in torch.nonzero(allowed).flatten()[:_FIRST_STEP_TRIES].tolist():
        probe = template.deep_copy()
        if probe.consume_token(token_id) and not probe.is_error():  # an id its own mask allows: no refusal but an error
            if probe.is_stopped():
                continue
            probe.compute_bitmask()
        if probe.is_error():
            raise GrammarError(f"{_KIND_WORDS[spec.kind]} too complex for the grammar engine: "
                               f"{one_line(probe.get_error())}")
        return


def one_line(message: str) -> str:
    """An llguidance error message on one line: its messages may add a caret diagram under the offending
    text; the first line and the `error:` line say what is wrong."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return message
    reasons = [line for line in lines[1:] if line.startswith("error:")]
    return " ".join([lines[0]] + reasons[:1])
