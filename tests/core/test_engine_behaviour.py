"""The engine's request life cycle on the demo model: stops, seeds, cancellation, UTF-8, failures."""
from __future__ import annotations

import logging
import time

import pytest
import torch

from tgserve.core.config import ServerConfig
from tgserve.core.engine import ENGINE_STOPPED_BY_INTERNAL_ERROR, STOPPED_WITH_REQUESTS_IN_FLIGHT, EngineStopped
from tgserve.core.engine_builder import build_engine
from tgserve.core.errors import RequestRejected
from tgserve.core.invariants import EngineInvariantError
from tgserve.core.plugins import BackendRegistry
from tgserve.core.request import ErrorEvent, GenerationRequest, SamplingParams, StoppingParams

from .engine_harness import Collected, request, run_all, running_engine


SMALL_LIMITS = {"max_batch_prefill_tokens": 64, "max_batch_total_tokens": 4096, "max_total_tokens": 512}


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    with running_engine(demo_model_dir, **SMALL_LIMITS) as engine:
        yield engine


def _encode(engine, text):
    return engine.tokenizer.encode(text)


def test_length_finish_and_event_indices(engine):
    (got,) = run_all(engine, [GenerationRequest(_encode(engine, "The garden"), SamplingParams(),
                                                StoppingParams(max_new_tokens=5, ignore_eos_token=True))])
    assert [e.index for e in got.events] == [1, 2, 3, 4, 5]
    assert got.finish.reason == "length" and got.finish.generated_tokens == 5


def test_stream_text_concatenates_to_final_text(engine):
    (got,) = run_all(engine, [request(_encode(engine, "Once upon a time"), 24)])
    assert "".join(e.text for e in got.events if not e.special) == got.finish.text


def test_seeded_sampling_is_independent_of_the_batch(engine):
    prompt = _encode(engine, "The river ran")
    sampled = dict(do_sample=True, temperature=1.3, seed=1234)
    (alone,) = run_all(engine, [request(prompt, 16, **sampled)])
    crowd = [request(_encode(engine, f"Other prompt {i}"), 16, do_sample=True, seed=i) for i in range(5)]
    together = run_all(engine, crowd[:2] + [request(prompt, 16, **sampled)] + crowd[2:])
    assert together[2].ids == alone.ids
    (other_seed,) = run_all(engine, [request(prompt, 16, do_sample=True, temperature=1.3, seed=99)])
    assert other_seed.ids != alone.ids
    assert alone.finish.seed == 1234


def test_stop_sequence_is_kept_in_the_output(engine):
    (free,) = run_all(engine, [request(_encode(engine, "Once upon a time"), 24)])
    words = free.finish.text.split()
    assert len(words) >= 3, free.finish.text
    stop = words[2]
    (got,) = run_all(engine, [GenerationRequest(_encode(engine, "Once upon a time"), SamplingParams(),
                                                StoppingParams(max_new_tokens=24, stop_sequences=(stop,)))])
    assert got.finish.reason == "stop_sequence"
    # TGI keeps the matched stop text: the output is the free run's text up to and including the first
    # occurrence of the stop (words[2] ends where a whitespace-led token begins, so at a token boundary).
    free_text = free.finish.text
    assert got.finish.text == free_text[:free_text.index(stop) + len(stop)]
    assert got.finish.text.endswith(stop)
    # ...and it stops at the first token whose text completes the stop, not later.
    shortest = next(n for n in range(1, len(free.ids) + 1) if stop in engine.tokenizer.decode(free.ids[:n]))
    assert got.ids == free.ids[:shortest]
    assert got.finish.generated_tokens == shortest < len(free.events)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", None])
def test_each_known_dtype_reaches_the_model(demo_model_dir, dtype):
    """`--dtype` (or, unset, the backend's default) is what the weights and the KV cache are built in."""
    expected = dtype or BackendRegistry().select("cpu").hook.tgserve_get_default_dtype()
    with running_engine(demo_model_dir, dtype=dtype, **SMALL_LIMITS) as dtyped:
        (got,) = run_all(dtyped, [request(_encode(dtyped, "Once upon a time"), 4)])
        assert dtyped.model_info.model_dtype == expected
        floats = {p.dtype for p in dtyped.runner.model.parameters() if p.is_floating_point()}
        assert floats == {getattr(torch, expected)}
    assert len(got.ids) == 4


def test_utf8_is_never_split(engine):
    text = "中文字符和表情 🌞🌈 测试"
    ids = engine.tokenizer.encode(text)
    pieces = [engine.tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the test text must contain tokens that split a character"
    # Prompt with the text itself and force it as the "generation" by checking the detokenizer directly.
    from tgserve.core.detokenizer import DetokenizerState, next_text
    state, out = DetokenizerState(), []
    for end in range(1, len(ids) + 1):
        out.append(next_text(engine.tokenizer, ids[:end], state))
    assert "".join(out) == text
    assert all("\ufffd" not in piece for piece in out)


def test_cancel_frees_blocks_and_others_continue(engine):
    long_req = GenerationRequest(_encode(engine, "The long one"), SamplingParams(),
                                 StoppingParams(max_new_tokens=400, ignore_eos_token=True))
    sink = Collected()
    request_id = engine.submit(long_req, sink)
    deadline = time.monotonic() + 30
    while len(sink.events) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.cancel(request_id)
    (other,) = run_all(engine, [request(_encode(engine, "Still serving"), 4)])
    assert other.finish is not None
    count = len(sink.events)
    time.sleep(0.2)
    assert len(sink.events) == count and sink.finish is None, "a cancelled request got more events"
    blocks = engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_usable_blocks


def test_failed_step_fails_its_requests_and_the_engine_recovers(engine, monkeypatch):
    real_execute = engine.runner.execute
    calls = {"n": 0}

    def failing_once(plan):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device fault")
        return real_execute(plan)

    monkeypatch.setattr(engine.runner, "execute", failing_once)
    (failed,) = run_all(engine, [request(_encode(engine, "doomed"), 4)])
    assert isinstance(failed.events[-1], ErrorEvent)
    assert "simulated device fault" in failed.events[-1].message
    (ok,) = run_all(engine, [request(_encode(engine, "fine"), 4)])
    assert ok.finish is not None and engine.is_healthy


def test_request_that_can_never_fit_is_refused_at_submit(engine):
    too_long = GenerationRequest([1] * 10, SamplingParams(), StoppingParams(max_new_tokens=10**6))
    with pytest.raises(RequestRejected):  # typed: the API maps only this rejection to 422
        engine.submit(too_long, Collected())


def test_shutdown_names_requests_it_stops_in_flight(demo_model_dir, caplog):
    """The warning the end-to-end shutdown tests look for appears when the drain wait runs out."""
    engine = build_engine(ServerConfig(model_id=str(demo_model_dir), **SMALL_LIMITS), BackendRegistry().select("cpu"),
                          progress=False)
    engine.start()
    sink = Collected()
    engine.submit(GenerationRequest(_encode(engine, "The long one"), SamplingParams(),
                                    StoppingParams(max_new_tokens=400, ignore_eos_token=True)), sink)
    with caplog.at_level(logging.WARNING, logger="tgserve.core.engine"):
        engine.shutdown(drain_timeout_s=0)
    assert not sink.done.is_set()  # stopped mid-way, not finished
    assert f"{STOPPED_WITH_REQUESTS_IN_FLIGHT}: 1 request(s)" in caplog.text


def test_broken_invariant_fails_every_request_and_stops_the_engine(demo_model_dir, monkeypatch, caplog):
    """An error outside the model step (here the block manager's double-free check) must not leave
    requests hanging on a dead engine thread: each gets an error event, /health's flag drops, new
    requests are refused."""
    with running_engine(demo_model_dir, **SMALL_LIMITS) as engine:
        def broken_free(block_ids):
            raise EngineInvariantError("a block was freed twice")

        long_one = Collected()
        engine.submit(GenerationRequest(_encode(engine, "The long one"), SamplingParams(),
                                        StoppingParams(max_new_tokens=400, ignore_eos_token=True)), long_one)
        monkeypatch.setattr(engine.scheduler.blocks, "free", broken_free)
        with caplog.at_level(logging.ERROR, logger="tgserve.core.engine"):
            short_one = Collected()
            engine.submit(request(_encode(engine, "short"), 2), short_one)  # its finish frees blocks: the fault
            assert short_one.done.wait(120) and long_one.done.wait(120)
        for sink in (short_one, long_one):
            assert isinstance(sink.events[-1], ErrorEvent) and "internal error" in sink.events[-1].message
        assert ENGINE_STOPPED_BY_INTERNAL_ERROR in caplog.text and "freed twice" in caplog.text
        assert not engine.is_healthy
        with pytest.raises(EngineStopped):
            engine.submit(request(_encode(engine, "after"), 2), Collected())
