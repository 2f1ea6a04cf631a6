"""The engine: a thread that runs steps while there is work, and the thread-safe way in and out.

Callers `submit` a `GenerationRequest` with a sink; the engine thread calls the sink once per
generated token (`TokenEvent`, the last one with `finish`) or once with an `ErrorEvent`. `stream`
wraps that for asyncio. A failing model step fails only the requests in it; the engine keeps serving.
A failure outside the model step (a broken engine invariant) fails every request in flight and stops
the engine, which then reports itself unhealthy.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from tgserve.core.speculation.acceptance import AcceptanceRule, Proposer, accept_matching_prefix
from tgserve.core.config import ServerConfig
from tgserve.core.detokenizer import DetokenizerState, final_text, next_text
from tgserve.core.distributed.collective_clock import CollectiveClock
from tgserve.core.errors import EngineStopped, GenerationError, RequestRejected  # noqa: F401 (re-exported)
from tgserve.core.invariants import EngineInvariantError
from tgserve.core.limits import RuntimeLimits
from tgserve.core.model_runner import ModelRunner, SampledToken
from tgserve.core.request import ErrorEvent, Finish, GenerationRequest, ModelInfo, TokenEvent, TopToken
from tgserve.core.grammar.state import grammar_request_states
from tgserve.core.request_state import RequestState
from tgserve.core.scheduler import Scheduler
from tgserve.core.sequence import Sequence
from tgserve.core.step_stats import StepObserver, StepStats
from tgserve.core.stop_sequences import StopMatcher
from tgserve.core.tokenizer import Tokenizer

log = logging.getLogger(__name__)
Sink = Callable[[TokenEvent | ErrorEvent], None]
# Logged (warning) by `Engine.shutdown` when its drain wait ends with requests still in flight.
STOPPED_WITH_REQUESTS_IN_FLIGHT = "Stopping with requests still in flight after the drain wait"
# Logged (with the traceback) when the engine loop fails outside a model step and stops for good.
ENGINE_STOPPED_BY_INTERNAL_ERROR = "Engine stopped by an internal error"


@dataclass(slots=True, eq=False)
class _Active:
    """Engine-thread state of one request beside its scheduler `Sequence`."""

    seq: Sequence
    sink: Sink
    stops: StopMatcher  # the request's stop sequences over its generated text
    detok: DetokenizerState = field(default_factory=DetokenizerState)
    prompt_logprobs: list[float] = field(default_factory=list)


class Engine:
    def __init__(self, config: ServerConfig, limits: RuntimeLimits, model_info: ModelInfo,
                 tokenizer: Tokenizer, scheduler: Scheduler, runner: ModelRunner,
                 on_shutdown: Callable[[], object] = lambda: None, observer: StepObserver | None = None,
                 proposer: Proposer | None = None, acceptance: AcceptanceRule = accept_matching_prefix,
                 make_request_states: Callable[[GenerationRequest], tuple[RequestState, ...]] = grammar_request_states,
                 collective_clock: CollectiveClock | None = None):
        self.config = config
        self.limits = limits
        self.model_info = model_info
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.runner = runner
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[int, _Active] = {}
        self._ids = itertools.count()
        self._is_accepting = True
        self._is_running = False
        self._is_healthy = True
        self._thread: threading.Thread | None = None
        self._on_shutdown = on_shutdown  # the backend's tgserve_on_shutdown, called once at the end
        self._observer = observer  # told about every step (see `set_observer`)
        self._filter_s = 0.0  # seconds spent freeing finished/cancelled sequences since the last step report
        # Multi-token steps (tgserve.core.speculation): guesses verified each step (None: one token per
        # step), and the rule that says how many sampled tokens a sequence keeps. Set before submitting.
        self.proposer = proposer
        self.acceptance = acceptance
        # request -> its RequestStates, at submit; by default its own grammar state for a request with a
        # grammar (each best_of candidate is a request of its own, so it gets its own matcher)
        self.make_request_states = make_request_states
        self._collective_clock = collective_clock  # sharded: rank 0's time in collectives, taken per step
        # compiles the grammars requests carry (`GenerationRequest.grammar`), off the engine thread; None:
        # grammars are not supported (--disable-grammar-support). Set by start-up (`engine_builder`).
        self.grammar_compiler = None
        if collective_clock is not None:
            collective_clock.take()  # start-up's probe and warmup steps are nobody's engine step

    # --- any thread ----------------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop on a new thread; does nothing if the loop already runs."""
        if self._is_running:
            return
        self._is_running = True
        self._thread = threading.Thread(target=self._loop, name="tgserve-engine", daemon=True)
        self._thread.start()

    def run_in_current_thread(self) -> None:
        """Run the loop on the calling thread until `shutdown` (see `engine_builder.start_engine`)."""
        self._is_running = True
        self._thread = threading.current_thread()
        self._loop()

    def submit(self, request: GenerationRequest, sink: Sink) -> int:
        """Queue `request`; returns its id. `sink` is called from the engine thread.

        Raises `RequestRejected` for a request the engine can never serve, `EngineStopped` while draining.
        """
        if not self._is_accepting:
            raise EngineStopped("the server is shutting down")
        max_tokens = len(request.input_ids) + request.stopping.max_new_tokens
        if not request.input_ids or not self.scheduler.can_ever_fit(max_tokens):
            raise RequestRejected(f"request needs {max_tokens} KV slots, more than the cache holds")
        if not 0 <= min(request.input_ids) <= max(request.input_ids) < self.runner.vocab_size:
            raise RequestRejected(f"input token ids must be in [0, {self.runner.vocab_size})")
        if request.grammar is not None and self.grammar_compiler is None:
            raise RequestRejected("grammar support is disabled (--disable-grammar-support)")
        request.request_id = next(self._ids)
        seq = Sequence(request.request_id, request, list(request.input_ids), len(request.input_ids),
                       max_tokens, arrival_s=time.monotonic(), states=tuple(self.make_request_states(request)))
        self._inbox.put(("add", _Active(seq, sink, StopMatcher(request.stopping.stop_sequences))))
        return request.request_id

    def set_observer(self, observer: StepObserver | None) -> None:
        """Report every step to `observer` from now on (None: stop reporting); any thread may call it."""
        self._observer = observer

    def cancel(self, request_id: int) -> None:
        """Drop a request: it leaves the batch before the next step and frees its blocks."""
        self._inbox.put(("cancel", request_id))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Submit and yield events in asyncio; closing the iterator early cancels the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:
                pass  # the event loop is gone; the request is being torn down

        request_id = self.submit(request, sink)
        is_done = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, ErrorEvent):
                    is_done = True
                    raise GenerationError(event.message)
                is_done = event.finish is not None
                yield event
                if is_done:
                    return
        finally:
            if not is_done:
                self.cancel(request_id)

    @property
    def is_healthy(self) -> bool:
        return self._is_healthy and self._is_running

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_used_kv_blocks(self) -> int:
        """KV-cache blocks that requests hold now (not the reserved block 0); 0 whenever none runs."""
        blocks = self.scheduler.blocks
        return blocks.num_usable_blocks - blocks.num_free_blocks

    @property
    def num_cached_kv_blocks(self) -> int:
        """Free KV-cache blocks still holding a prefix a new request may reuse (prefix caching)."""
        return self.scheduler.blocks.num_cached_free_blocks

    @property
    def num_in_flight(self) -> int:
        return len(self._active) + self._inbox.qsize()

    def shutdown(self, drain_timeout_s: float) -> None:
        """Stop taking requests, let in-flight ones finish for up to `drain_timeout_s`, then stop."""
        self._is_accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self.num_in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.num_in_flight:
            log.warning("%s: %d request(s) after %.1f s", STOPPED_WITH_REQUESTS_IN_FLIGHT, self.num_in_flight,
                        drain_timeout_s)
        self._is_running = False
        self._inbox.put(("wake", None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if self.grammar_compiler is not None:
            self.grammar_compiler.close()
        self._on_shutdown()

    # --- engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._is_running:
                self.step(wait_for_work=True)
        except Exception as error:  # outside a model step: the engine's own state may be broken
            self._stop_broken(error)

    def _stop_broken(self, error: Exception) -> None:
        """Stop for good after a failure outside the model step (e.g. an `EngineInvariantError`).

        The scheduler's and the block manager's state can no longer be trusted, so nothing is
        freed: every request in flight, and any still in the inbox, gets an error event instead of
        hanging; /health turns 503 and new requests are refused, so a supervisor restarts the server.
        """
        log.exception("%s: %s", ENGINE_STOPPED_BY_INTERNAL_ERROR, error)
        self._is_accepting = False
        self._is_healthy = False
        self._is_running = False
        message = f"internal error, the engine stopped ({error})"
        pending = list(self._active.values())
        self._active.clear()
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                pending.append(payload)
        for active in pending:
            active.sink(ErrorEvent(message))

    def step(self, wait_for_work: bool = False) -> None:
        """Take in new requests and cancels, then plan, compute and apply one step, on the calling thread.

        The loop calls it; so does `tgserve benchmark engine`, which builds an engine, never starts it,
        and steps it itself. wait_for_work: when nothing is queued or running, block until a request
        or a cancel arrives (the loop); otherwise a step with no work only reports idle.
        """
        self._drain_inbox(block=wait_for_work and not self.scheduler.has_work)
        self._step()

    def _step(self) -> None:
        """Plan, compute and apply one step; report it to the observer, if any."""
        started_s = time.perf_counter()
        if self.proposer is not None:
            self._propose(self.proposer)
        plan = self.scheduler.schedule()
        if not plan:
            self._filter_s = 0.0
            if self._observer is not None:
                self._notify(self._observer.on_idle)
            return
        scheduled_s = time.perf_counter()
        now = time.monotonic()
        num_new_seqs = num_prefill_tokens = 0
        for item in plan.scheduled:
            seq = item.seq
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = now
                num_new_seqs += 1
            num_prefill_tokens += max(0, min(item.num_new_tokens, seq.num_prompt_tokens - seq.num_computed_tokens))
        try:
            output = self.runner.execute(plan)
        except Exception as error:  # a failed step fails its requests, never the engine
            failed_s = time.perf_counter()
            log.exception("step failed")
            self._is_healthy = False
            for item in plan.scheduled:
                self._fail(item.seq.request_id, str(error))
            self._report(plan, num_new_seqs, num_prefill_tokens, (started_s, scheduled_s, failed_s), False)
            return
        self._is_healthy = True
        forwarded_s = time.perf_counter()
        self._update(plan, output)
        if self.proposer is not None and num_prefill_tokens == 0:  # what a decoding row costs here
            self.proposer.observe_step(plan.num_tokens, forwarded_s - scheduled_s)
        self._report(plan, num_new_seqs, num_prefill_tokens, (started_s, scheduled_s, forwarded_s), True)

    def _report(self, plan, num_new_seqs: int, num_prefill_tokens: int,
                marks_s: tuple[float, float, float], is_ok: bool) -> None:
        """Hand the observer this step's `StepStats`; `marks_s` = perf_counter at start, planned, computed."""
        observer, filter_s, self._filter_s = self._observer, self._filter_s, 0.0
        num_collectives, collective_s = self._collective_clock.take() if self._collective_clock else (0, 0.0)
        if observer is None:
            return
        ended_s = time.perf_counter()
        started_s, scheduled_s, forwarded_s = marks_s
        running = self.scheduler.running
        stats = StepStats(
            num_seqs=len(plan.scheduled), num_new_seqs=num_new_seqs, num_tokens=plan.num_tokens,
            num_prefill_tokens=num_prefill_tokens, num_running=len(running), num_waiting=len(self.scheduler.waiting),
            max_batch_tokens=sum(seq.max_tokens for seq in running), schedule_s=scheduled_s - started_s,
            forward_s=forwarded_s - scheduled_s, update_s=ended_s - forwarded_s if is_ok else 0.0,
            filter_s=filter_s, duration_s=ended_s - started_s, is_ok=is_ok, num_collectives=num_collectives,
            collective_s=collective_s)
        self._notify(observer.on_step, stats)

    @staticmethod
    def _notify(callback: Callable, *args: object) -> None:
        try:
            callback(*args)
        except Exception:  # a broken observer must not stop the engine
            log.exception("step observer failed")

    def _release(self, seq: Sequence) -> None:
        """Take `seq` out of the batch and free its blocks, timed as the step's filter work."""
        started_s = time.perf_counter()
        self.scheduler.finish(seq)
        self._filter_s += time.perf_counter() - started_s

    def _drain_inbox(self, block: bool) -> None:
        try:
            message = self._inbox.get(block=block)
            while True:
                kind, payload = message
                if kind == "add":
                    self._active[payload.seq.request_id] = payload
                    self.scheduler.add(payload.seq)
                elif kind == "cancel" and payload in self._active:
                    self._release(self._active.pop(payload).seq)
                message = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _fail(self, request_id: int, message: str) -> None:
        active = self._active.pop(request_id, None)
        if active is not None:
            self._release(active.seq)
            active.sink(ErrorEvent(message))

    def _propose(self, proposer: Proposer) -> None:
        """Append the proposer's guesses to every decoding sequence; the next step verifies them.

        A sequence of L tokens (the last one not yet computed) may still generate max_tokens - L + 1
        tokens, and a step that verifies k guesses yields at most k + 1: so k <= max_tokens - L - 1.
        That also keeps every verified position inside the KV slots reserved at admission (positions
        up to max_tokens - 2), so a request near max_new_tokens / max_total_tokens proposes fewer and
        never needs a block more than it holds."""
        seqs, limits = [], []
        for seq in self.scheduler.running:
            room = seq.max_tokens - len(seq.token_ids) - 1
            if seq.num_uncomputed_tokens == 1 and room > 0:
                seqs.append(seq)
                limits.append(room)
        if not seqs:
            return
        for seq, proposed, limit in zip(seqs, proposer.propose_batch(seqs, limits), limits):
            proposed = proposed[:limit]
            seq.token_ids.extend(proposed)
            seq.num_proposed_tokens = len(proposed)

    def _update(self, plan, output) -> None:
        """Apply a step: advance every sequence by its accepted positions and emit its accepted tokens.

        `output.sampled` holds `item.num_sampled` tokens per sampling sequence, in plan order. Of a
        sequence's k proposed tokens the acceptance rule keeps a prefix of n - 1 plus the bonus token;
        the k - n + 1 positions after them are rolled back (not counted as computed; their K/V are
        overwritten when the positions are computed again)."""
        offset = 0
        for item in plan.scheduled:
            seq = item.seq
            active = self._active.get(seq.request_id)
            if not item.is_sampling:
                self.scheduler.advance(seq, item.num_new_tokens)
                if active is not None:
                    active.prompt_logprobs.extend(output.prompt_logprobs.get(seq.request_id, ()))
                continue
            tokens = output.sampled[offset:offset + item.num_sampled]
            offset += item.num_sampled
            num_proposed = seq.num_proposed_tokens
            num_accepted = 1
            if num_proposed:
                num_accepted = self.acceptance(seq.token_ids[len(seq.token_ids) - num_proposed:],
                                               [token.id for token in tokens])
                if not 1 <= num_accepted <= num_proposed + 1:
                    raise EngineInvariantError(f"accepted {num_accepted} of {num_proposed + 1} sampled tokens")
                self.proposer.observe(seq, num_proposed, num_accepted)
            if output.head_ids and self.proposer is not None:  # Medusa: guesses after the last kept token
                self.proposer.take_guesses(seq, output.head_ids[offset - item.num_sampled + num_accepted - 1])
            # Accepted proposals are still in token_ids here, so the blocks they fill hash right.
            self.scheduler.advance(seq, item.num_new_tokens - (num_proposed - num_accepted + 1))
            del seq.token_ids[len(seq.token_ids) - num_proposed:]  # the kept ones come back as sampled tokens
            seq.num_proposed_tokens = 0
            if active is None:
                continue
            active.prompt_logprobs.extend(output.prompt_logprobs.get(seq.request_id, ()))
            for num_emitted, token in enumerate(tokens[:num_accepted], start=1):
                if self._append(active, token, num_emitted, num_emitted == num_accepted):
                    break  # finished: tokens after a stop or past max_new_tokens are not emitted

    def _append(self, active: _Active, token: SampledToken, num_emitted: int = 1, is_last: bool = True) -> bool:
        """Append one accepted token and emit its event; True when it finished the request.

        num_emitted: this token's place (1-based) among the tokens the step emits for the request;
        is_last: no accepted token of the step follows it. The step's last event carries the count."""
        seq, tokenizer = active.seq, self.tokenizer
        seq.token_ids.append(token.id)
        for state in seq.states:
            state.on_accept(token.id)
        error = next((state.error for state in seq.states if state.error is not None), None)
        if error is not None:  # e.g. a grammar with no next token: the token is not emitted
            self._fail(seq.request_id, error)
            return True
        generated = seq.token_ids[seq.num_prompt_tokens:]
        text = next_text(tokenizer, generated, active.detok)
        reason = self._finish_reason(seq, token.id, active.stops.feed(text))
        finish = None
        if reason is not None:
            text += final_text(tokenizer, generated, active.detok)  # an incomplete last character, as decoded
            now = time.monotonic()
            sampling = seq.request.sampling
            finish = Finish(reason=reason, generated_tokens=len(generated),
                            seed=None if sampling.is_greedy else sampling.seed,
                            text=tokenizer.decode(generated, skip_special_tokens=True),
                            queue_s=seq.first_scheduled_s - seq.arrival_s, inference_s=now - seq.first_scheduled_s,
                            cached_tokens=seq.num_cached_tokens)
            self._release(seq)
            del self._active[seq.request_id]
        active.sink(TokenEvent(
            id=token.id, text=text, logprob=token.logprob, special=tokenizer.is_special(token.id),
            index=len(generated), top_tokens=tuple(self._top(t, p) for t, p in token.top),
            prefill=self._prefill(active) if len(generated) == 1 else (), finish=finish,
            num_step_tokens=num_emitted if is_last or finish is not None else 0))
        return finish is not None

    def _finish_reason(self, seq: Sequence, token_id: int, is_stop_found: bool) -> str | None:
        stopping = seq.request.stopping
        if seq.num_generated_tokens >= stopping.max_new_tokens:
            return "length"
        if token_id in self.tokenizer.eos_token_ids and (
                not stopping.ignore_eos_token or any(state.is_complete for state in seq.states)):
            return "eos_token"
        if is_stop_found:
            return "stop_sequence"
        return None

    def _top(self, token_id: int, logprob: float) -> TopToken:
        tokenizer = self.tokenizer
        return TopToken(token_id, tokenizer.id_to_text(token_id), logprob, tokenizer.is_special(token_id))

    def _prefill(self, active: _Active) -> tuple[TopToken, ...]:
        if not active.seq.request.prefill_logprobs:
            return ()
        prompt = active.seq.token_ids[:active.seq.num_prompt_tokens]
        logprobs = [float("nan")] + active.prompt_logprobs
        return tuple(self._top(t, lp) for t, lp in zip(prompt, logprobs))
