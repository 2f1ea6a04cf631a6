"""Run requests through a real in-process Engine and collect their events (test helper)."""
from __future__ import annotations

import contextlib
import threading

from tgserve.core.config import ServerConfig
from tgserve.core.engine_builder import build_engine
from tgserve.core.plugins import BackendRegistry

from tgserve.core.request import ErrorEvent, GenerationRequest, SamplingParams, StoppingParams


class Collected:
    """Every event one request produced, and a flag set when its last one arrived."""

    def __init__(self):
        self.events = []
        self.done = threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, ErrorEvent) or event.finish is not None:
            self.done.set()

    @property
    def ids(self) -> list[int]:
        return [e.id for e in self.events]

    @property
    def finish(self):
        return self.events[-1].finish


def request(input_ids, max_new_tokens=12, **sampling) -> GenerationRequest:
    return GenerationRequest(list(input_ids), SamplingParams(**sampling), StoppingParams(max_new_tokens=max_new_tokens))


def run_all(engine, requests, timeout_s: float = 120) -> list[Collected]:
    """Submit all requests at once (they share steps), wait for every one to finish."""
    sinks = [Collected() for _ in requests]
    for req, sink in zip(requests, sinks):
        engine.submit(req, sink)
    for sink in sinks:
        assert sink.done.wait(timeout_s), "request did not finish"
    return sinks


@contextlib.contextmanager
def running_engine(model_dir, **config):
    """A started cpu-backend Engine on `model_dir` with ServerConfig fields `config`; shut down after."""
    engine = build_engine(ServerConfig(model_id=str(model_dir), **config), BackendRegistry().select("cpu"),
                          progress=False)
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown(drain_timeout_s=5)
