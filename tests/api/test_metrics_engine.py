"""The engine's observer seam over a scripted model runner (the real scheduler and block manager):
one `StepStats` per step, prompt chunks counted as prefill, the batch emptied by the last step or
by a cancel reported at once, a failing step reported as failed, and a broken observer never
stopping the engine."""
from __future__ import annotations

import threading
import time

from tgserve.core.block_manager import BlockManager
from tgserve.core.config import ServerConfig
from tgserve.core.engine import Engine
from tgserve.core.limits import RuntimeLimits
from tgserve.core.model_runner import SampledToken, StepOutput
from tgserve.core.request import ErrorEvent, GenerationRequest, ModelInfo, SamplingParams, StoppingParams
from tgserve.core.scheduler import Scheduler

MAX_STEP_TOKENS = 8  # a 20-token prompt takes three prefill chunks


class LetterTokenizer:
    """Token id n is the letter chr(n); nothing is special, nothing ends a sequence."""

    eos_token_ids = ()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)

    def id_to_text(self, token_id):
        return chr(token_id)

    def is_special(self, token_id):
        return False


class ScriptedRunner:
    """Samples "a" for every sampling sequence, `step_s` apart; raises once `fail_next` is set."""

    vocab_size = 256

    def __init__(self):
        self.fail_next = False
        self.step_s = 0.0

    def execute(self, plan):
        time.sleep(self.step_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        return StepOutput([SampledToken(ord("a"), -0.1, []) for item in plan.scheduled if item.is_sampling], {})


class Recorder:
    """Keeps every report; `idle` is set on `on_idle`."""

    def __init__(self):
        self.steps, self.idle = [], threading.Event()

    def on_step(self, stats):
        self.steps.append(stats)

    def on_idle(self):
        self.idle.set()


def make_engine(observer=None) -> tuple[Engine, ScriptedRunner]:
    limits = RuntimeLimits(max_input_tokens=64, max_total_tokens=128, max_batch_prefill_tokens=MAX_STEP_TOKENS,
                           max_batch_total_tokens=1024, max_batch_size=None, num_blocks=65, block_size=16)
    runner = ScriptedRunner()
    scheduler = Scheduler(BlockManager(limits.num_blocks, limits.block_size), MAX_STEP_TOKENS, None)
    info = ModelInfo("fake/letters", None, "float32", "cpu", "fake")
    return Engine(ServerConfig(), limits, info, LetterTokenizer(), scheduler, runner, observer=observer), runner


def run(engine: Engine, num_prompt_tokens: int, max_new_tokens: int) -> list:
    events, done = [], threading.Event()

    def sink(event):
        events.append(event)
        if isinstance(event, ErrorEvent) or event.finish is not None:
            done.set()

    request = GenerationRequest([ord("p")] * num_prompt_tokens, SamplingParams(),
                                StoppingParams(max_new_tokens=max_new_tokens))
    engine.submit(request, sink)
    assert done.wait(10), "request did not finish"
    return events


def test_one_report_per_step_prefill_chunks_then_decodes():
    recorder = Recorder()
    engine, _ = make_engine(recorder)
    engine.start()
    try:
        events = run(engine, num_prompt_tokens=20, max_new_tokens=4)
    finally:
        engine.shutdown(drain_timeout_s=1)
    assert events[-1].finish.generated_tokens == 4
    steps = recorder.steps
    assert [s.num_prefill_tokens for s in steps] == [8, 8, 4, 0, 0, 0]  # 3 chunks sample the 1st token, 3 decodes
    assert [s.is_prefill for s in steps] == [True] * 3 + [False] * 3
    assert [s.num_new_seqs for s in steps] == [1, 0, 0, 0, 0, 0]
    assert all(s.is_ok and s.num_seqs == 1 for s in steps)
    assert [s.num_running for s in steps] == [1, 1, 1, 1, 1, 0]  # the last step finished it
    assert steps[0].max_batch_tokens == 24 and steps[-1].max_batch_tokens == 0
    for s in steps:
        assert 0 <= s.forward_s <= s.duration_s and s.filter_s <= s.update_s <= s.duration_s
    assert steps[-1].filter_s > 0 and steps[0].filter_s == 0  # freeing the finished request is filter work


def test_a_cancel_that_empties_the_batch_reports_idle():
    recorder = Recorder()
    engine, runner = make_engine(recorder)
    runner.step_s = 0.01
    engine.start()
    events, first_token = [], threading.Event()
    try:
        request = GenerationRequest([ord("p")] * 3, SamplingParams(), StoppingParams(max_new_tokens=100))
        request_id = engine.submit(request, lambda event: (events.append(event), first_token.set()))
        assert first_token.wait(5)
        engine.cancel(request_id)
        assert recorder.idle.wait(5)  # no step follows the cancel, so the observer hears it this way
    finally:
        engine.shutdown(drain_timeout_s=1)
    assert events[-1].finish is None and recorder.steps[-1].num_running == 1
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_usable_blocks


def test_failed_step_is_reported_and_a_broken_observer_is_ignored():
    class Broken(Recorder):
        def on_step(self, stats):
            super().on_step(stats)
            raise RuntimeError("observer bug")

    recorder = Broken()
    engine, runner = make_engine()
    engine.set_observer(recorder)  # attached after construction, as the app does
    engine.start()
    try:
        runner.fail_next = True
        assert isinstance(run(engine, num_prompt_tokens=3, max_new_tokens=2)[-1], ErrorEvent)
        assert run(engine, num_prompt_tokens=3, max_new_tokens=2)[-1].finish is not None  # still serving
    finally:
        engine.shutdown(drain_timeout_s=1)
    assert [s.is_ok for s in recorder.steps] == [False, True, True]
    assert recorder.steps[0].num_running == 0 and recorder.steps[0].filter_s > 0
