"""Parity of the engine with Hugging Face transformers on one checkpoint, on any backend's device.

What the GPU check (`benchmark/gpu_check.py`) asks of every checkpoint it is given:
  - float32 greedy: the engine's token ids equal transformers `generate`'s, for prompts of several
    lengths (windows of the bundled demo corpus, so any tokenizer works), one at a time and all at
    once, with a prefill budget small enough that the long prompts are chunked;
  - bfloat16: the engine's top-5 logprobs at the first generated position lie within `tolerance`
    nats of float32 transformers' log-softmax, beyond the distance transformers' own bf16 run has
    on the same tokens;
  - optionally a chat question whose greedy answer must contain a word ("Paris").
transformers runs on the engine's own device, so a GPU run compares GPU with GPU. The result is a
JSON-able dict that says what matched and, where something did not, where it first diverged.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from tgserve.core.request import ErrorEvent, GenerationRequest, SamplingParams, StoppingParams

REQUEST_TIMEOUT_S = 300.0  # one batch of requests; a hang is reported, not waited out
TOP_N = 5  # alternatives compared in bf16 (TGI's default --max-top-n-tokens)


@dataclass(slots=True, frozen=True)
class ParityConfig:
    """One checkpoint's parity check."""

    model_dir: Path
    backend: str  # a backend plugin name: "cuda" on the device, "cpu" here
    prompt_lengths: tuple[int, ...]  # prompt tokens of each greedy prompt; all of them also run at once
    new_tokens: int  # greedy tokens generated per prompt (fewer where the model emits an eos)
    max_batch_prefill_tokens: int  # below the longest prompt, so it is prefilled in chunks
    num_logprob_prompts: int = 3  # the first N prompts of at least 2 tokens get the bf16 top-5 check
    tolerance_nats: float = 0.1  # bf16: allowed beyond transformers' own bf16 error
    chat_question: str | None = None  # asked through the chat template, answered greedily in float32
    chat_answer: str | None = None  # the word the answer must contain


class _Collected:
    """Every event one request produced; `done` is set by its last one."""

    def __init__(self):
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, ErrorEvent) or event.finish is not None:
            self.done.set()


def run_requests(engine, requests: list[GenerationRequest]) -> list[list]:
    """Submit all requests at once (they share steps); the events of each. Raises on error or hang."""
    sinks = [_Collected() for _ in requests]
    for request, sink in zip(requests, sinks):
        engine.submit(request, sink)
    for sink in sinks:
        if not sink.done.wait(REQUEST_TIMEOUT_S):
            raise TimeoutError(f"a request did not finish within {REQUEST_TIMEOUT_S:.0f} s")
        if isinstance(sink.events[-1], ErrorEvent):
            raise RuntimeError(f"the engine failed a request: {sink.events[-1].message}")
    return [sink.events for sink in sinks]


@contextlib.contextmanager
def running_engine(config: ParityConfig, dtype: str, num_requests: int) -> Iterator:
    """A started engine on `config`'s backend with limits that fit `num_requests` prompts at once."""
    from tgserve.core.config import ServerConfig
    from tgserve.core.engine_builder import build_engine
    from tgserve.core.plugins import BackendRegistry

    max_total = max(config.prompt_lengths) + config.new_tokens + 1
    server = ServerConfig(model_id=str(config.model_dir), dtype=dtype, backend=config.backend,
                          max_total_tokens=max_total, max_batch_prefill_tokens=config.max_batch_prefill_tokens,
                          max_batch_total_tokens=max(num_requests, 2) * max_total * 2)
    engine = build_engine(server, BackendRegistry().select(config.backend), progress=False)
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown(drain_timeout_s=5)


def corpus_prompts(tokenizer, lengths: tuple[int, ...]) -> list[list[int]]:
    """Prompts of exactly `lengths` tokens: windows of the demo corpus at different offsets."""
    from tgserve.checkpoints.demo_tokenizer import read_demo_corpus

    ids = tokenizer(read_demo_corpus(), add_special_tokens=False).input_ids
    while len(ids) < 2 * max(lengths):
        ids = ids + ids
    return [ids[(i * 97) % (len(ids) - n): (i * 97) % (len(ids) - n) + n] for i, n in enumerate(lengths)]


def reference_greedy(model, prompts: list[list[int]], new_tokens: int, device) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time (no padding), eos ignored."""
    out = []
    for ids in prompts:
        with torch.inference_mode():
            generated = model.generate(torch.tensor([ids], device=device), attention_mask=None,
                                       max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                       pad_token_id=0)
        out.append(generated[0, len(ids):].tolist())
    return out


def cut_at_eos(ids: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    """`ids` up to and including the first eos: where the engine stops."""
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[:i + 1]
    return ids


def first_mismatch(expected: list[int], got: list[int]) -> int | None:
    """Index of the first differing token (or of the end of the shorter list); None when equal."""
    if expected == got:
        return None
    return next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))


def compare_greedy(expected: list[list[int]], got: list[list[int]], lengths: tuple[int, ...]) -> dict:
    """{"is_equal", "mismatches": [{prompt_tokens, at, expected, got}]} for one pass over the prompts."""
    mismatches = []
    for n, want, have in zip(lengths, expected, got):
        at = first_mismatch(want, have)
        if at is not None:
            mismatches.append({"prompt_tokens": n, "at": at, "expected": want[at:at + 4], "got": have[at:at + 4]})
    return {"is_equal": not mismatches, "mismatches": mismatches}


def greedy_parity(config: ParityConfig, model, prompts: list[list[int]], device) -> dict:
    """float32 greedy ids, alone and all at once, against transformers on `device`."""
    reference = reference_greedy(model, prompts, config.new_tokens, device)
    with running_engine(config, "float32", len(prompts)) as engine:
        eos = engine.tokenizer.eos_token_ids
        expected = [cut_at_eos(ids, eos) for ids in reference]

        def requests() -> list[GenerationRequest]:
            return [GenerationRequest(list(ids), SamplingParams(), StoppingParams(config.new_tokens))
                    for ids in prompts]

        alone = [run_requests(engine, [request])[0] for request in requests()]
        together = run_requests(engine, requests())
        result = {"alone": compare_greedy(expected, [[e.id for e in events] for events in alone],
                                          config.prompt_lengths),
                  "concurrent": compare_greedy(expected, [[e.id for e in events] for events in together],
                                               config.prompt_lengths),
                  "device": str(engine.runner.device), "eos_token_ids": list(eos)}
        if config.chat_question:
            result["chat"] = chat_answer(engine, config)
    return result


def chat_answer(engine, config: ParityConfig) -> dict:
    """The greedy float32 answer to `chat_question` through the checkpoint's chat template."""
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": config.chat_question}])
    ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    (events,) = run_requests(engine, [GenerationRequest(ids, SamplingParams(), StoppingParams(32))])
    text = events[-1].finish.text
    return {"question": config.chat_question, "answer": text, "expected_word": config.chat_answer,
            "is_correct": config.chat_answer in text}


def _last_logprobs(model, ids: list[int], device) -> torch.Tensor:
    """log-softmax over the vocabulary after `ids`, float32 on the CPU."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=device)).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1).cpu()


def bf16_logprob_parity(config: ParityConfig, model, prompts: list[list[int]], device) -> dict:
    """bf16 engine top-5 logprobs at the first generated position against float32 transformers, allowing
    `tolerance` nats beyond transformers' own bf16 error on the same tokens (a bf16 load of the
    checkpoint, as a user makes it: `model.to(bfloat16)` would also round the rotary tables).

    Why the allowance: bf16 weights move transformers' own logprobs by up to 0.17 nats from its float32
    ones (SmolLM2, a 5-token prompt, measured here on the CPU), so a fixed 0.1 nats would fail the
    reference itself; an engine bug (a wrong rotary, a misread KV block) costs whole nats.
    """
    prompts = [ids for ids in prompts if len(ids) >= 2][:config.num_logprob_prompts]
    from transformers import AutoModelForCausalLM

    float32 = [_last_logprobs(model, ids, device) for ids in prompts]
    model_bf16 = AutoModelForCausalLM.from_pretrained(str(config.model_dir), dtype=torch.bfloat16).to(device).eval()
    bfloat16 = [_last_logprobs(model_bf16, ids, device) for ids in prompts]
    del model_bf16
    rows = []
    with running_engine(config, "bfloat16", 1) as engine:
        for ids, ref32, ref16 in zip(prompts, float32, bfloat16):
            request = GenerationRequest(list(ids), SamplingParams(), StoppingParams(1), top_n_tokens=TOP_N)
            (events,) = run_requests(engine, [request])
            top = events[0].top_tokens
            error = max(abs(t.logprob - float(ref32[t.id])) for t in top)
            reference_error = max(abs(float(ref16[t.id]) - float(ref32[t.id])) for t in top)
            rows.append({"prompt_tokens": len(ids), "num_top_tokens": len(top), "max_abs_diff_nats": error,
                         "transformers_bf16_max_abs_diff_nats": reference_error,
                         "allowed_nats": reference_error + config.tolerance_nats,
                         "top1_engine": events[0].id, "top1_float32": int(ref32.argmax())})
    is_close = all(row["max_abs_diff_nats"] <= row["allowed_nats"] and row["num_top_tokens"] == TOP_N
                   for row in rows)
    return {"is_close": is_close, "max_abs_diff_nats": max(row["max_abs_diff_nats"] for row in rows),
            "transformers_bf16_max_abs_diff_nats": max(row["transformers_bf16_max_abs_diff_nats"] for row in rows),
            "tolerance_nats": config.tolerance_nats, "prompts": rows}


def run_parity(config: ParityConfig) -> dict:
    """The whole check on one checkpoint; `passed` is True when every part held."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tgserve.core.plugins import BackendRegistry

    device = BackendRegistry().select(config.backend).hook.tgserve_get_device(rank=0)
    tokenizer = AutoTokenizer.from_pretrained(str(config.model_dir))
    prompts = corpus_prompts(tokenizer, config.prompt_lengths)
    model = AutoModelForCausalLM.from_pretrained(str(config.model_dir), dtype=torch.float32).to(device).eval()
    greedy = greedy_parity(config, model, prompts, device)
    logprobs = bf16_logprob_parity(config, model, prompts, device)
    passed = (greedy["alone"]["is_equal"] and greedy["concurrent"]["is_equal"] and logprobs["is_close"]
              and greedy.get("chat", {}).get("is_correct", True))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    return {"passed": passed, "config": settings, "float32_greedy": greedy, "bf16_top_logprobs": logprobs}
