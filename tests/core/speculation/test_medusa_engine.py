"""Medusa heads in the engine on the demo model: a Medusa checkpoint (TGI's layout, heads briefly
trained by `write_demo_medusa`) serves its base model, and the heads' guesses, computed in the same
step as the target, are verified inside continuous batching.

Oracle: the same engine with speculation off (proposer None), the `--speculate 0` output: greedy and
seeded sampled ids equal token for token, logprobs and top tokens within float32 noise. The prompts
are the demo model's own text, so the heads guess right and every test checks that some guesses were
accepted (steps that gave a request more than one token).
"""
from __future__ import annotations

import json
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.distributed.ranks import Ranks
from tgserve.core.distributed.tensor_parallel import TensorParallel
from tgserve.core.engine_builder import build_engine
from tgserve.core.plugins import BackendRegistry
from tgserve.core.speculation import MedusaProposer
from tgserve.core.speculation.adaptive import AdaptiveProposer

from ..engine_harness import Collected, run_all, running_engine
from .test_medusa_checkpoint import reference_guesses
from .test_speculative_engine import (PlanRecorder, assert_no_blocks_held, assert_same_tokens, num_skipped, request,
                                      speculating, step_runs)

NUM_HEADS = 3
MAX_BATCH_PREFILL_TOKENS = 64
PROMPTS = [
    "The lighthouse stands on a rock at the end of the long grey pier. Every evening the keeper",
    "Bread is made from four simple things: flour, water, salt, and yeast. The baker",
    "When the sun goes down, the keeper lights the lamp.",
]
LONG_PROMPT = " ".join(["In winter the storms come in from the west."] * 14)


@pytest.fixture(scope="module")
def engine(medusa_dir):
    """--model-id MEDUSA_DIR with no --speculate: N is the head count."""
    with running_engine(medusa_dir, dtype="float32", max_batch_prefill_tokens=MAX_BATCH_PREFILL_TOKENS,
                        max_batch_total_tokens=8192, max_total_tokens=512) as engine:
        # --speculate serves adaptive lengths over the heads; these tests pin the heads' own lengths
        # (test_adaptive_lengths_over_the_heads_keep_the_output runs the wrapper).
        assert isinstance(engine.proposer, AdaptiveProposer)
        engine.proposer = engine.proposer.inner
        yield engine


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer.encode(p) for p in PROMPTS]


def run(engine, speculate: int, requests):
    with speculating(engine, MedusaProposer(speculate) if speculate else None):
        return run_all(engine, requests)


def mean_accepted_length(results) -> float:
    """Tokens per step that gave a request tokens, over all `results`."""
    num_steps = sum(1 for got in results for e in got.events if e.num_step_tokens)
    return sum(len(got.events) for got in results) / num_steps


@pytest.fixture(scope="module")
def greedy_reference(engine, prompts):
    return [run(engine, 0, [request(ids, top_n_tokens=2)])[0] for ids in prompts]


def test_a_medusa_checkpoint_serves_its_base_model_with_its_heads(engine, medusa_dir, demo_model_dir):
    assert engine.config.speculate == NUM_HEADS  # the default: the head count
    assert isinstance(engine.proposer, MedusaProposer) and engine.proposer.num_tokens == NUM_HEADS
    assert engine.runner.heads.num_heads == NUM_HEADS
    assert engine.model_info.model_id == str(medusa_dir)


def test_proposals_are_the_heads_guesses_at_the_last_kept_token(engine, prompts, medusa_dir, demo_model_dir):
    """Every proposal equals the heads' guesses (read independently from the file) on transformers'
    final hidden state of the token before the sequence's last one (the row that sampled it)."""
    calls = []

    class Recording(MedusaProposer):
        def propose(self, seq, max_tokens):
            proposed = super().propose(seq, max_tokens)
            calls.append((list(seq.token_ids), max_tokens, proposed))
            return proposed

    with speculating(engine, Recording(NUM_HEADS)):
        (got,) = run_all(engine, [request(prompts[0])])
    ids = prompts[0] + got.ids
    model = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    expected = reference_guesses(medusa_dir, NUM_HEADS, 1, hidden, model.lm_head.weight)
    assert len(calls) > 3 and len(calls[0][0]) == len(prompts[0]) + 1  # the first: right after prefill
    for seen, max_tokens, proposed in calls:
        assert seen == ids[:len(seen)]
        assert proposed == expected[len(seen) - 2][:min(NUM_HEADS, max_tokens)]


@pytest.mark.parametrize("speculate", [1, 2, NUM_HEADS])
def test_greedy_alone_equals_speculate_0_and_guesses_are_accepted(engine, prompts, greedy_reference, speculate):
    got = [run(engine, speculate, [request(ids, top_n_tokens=2)])[0] for ids in prompts]
    for result, ref in zip(got, greedy_reference):
        assert_same_tokens(result, ref)
        assert all(len(r) <= speculate + 1 for r in step_runs(result))
    assert mean_accepted_length(got) > 1.0, "no Medusa guess was ever accepted"
    assert_no_blocks_held(engine)


@pytest.mark.parametrize("speculate", [0, 1, 2, NUM_HEADS])
def test_greedy_concurrent_with_prefill_chunks_equals_speculate_0(engine, prompts, greedy_reference, speculate):
    """All prompts at once, a long one prefilling in chunks while the others verify guesses."""
    long_prompt = engine.tokenizer.encode(LONG_PROMPT)
    assert len(long_prompt) > 2 * MAX_BATCH_PREFILL_TOKENS
    (long_ref,) = run(engine, 0, [request(long_prompt, top_n_tokens=2)])
    engine.scheduler.blocks.clear_cache()  # the long prompt prefills in chunks again, not from the cache
    with PlanRecorder(engine.scheduler) as recorder:
        *got, long_got = run(engine, speculate, [request(ids, top_n_tokens=2) for ids in prompts]
                             + [request(long_prompt, top_n_tokens=2)])
    for result, ref in zip(got + [long_got], greedy_reference + [long_ref]):
        assert_same_tokens(result, ref)
    if speculate:
        assert sum(num_skipped(result) for result in got) > 0
        assert any(any(s == 0 for _, s in plan) and any(s > 1 for _, s in plan) for plan in recorder.plans)
    assert_no_blocks_held(engine)


def test_seeded_sampling_equals_speculate_0(engine, prompts):
    sampling = [dict(do_sample=True, temperature=0.5, seed=7 + i) for i in range(len(prompts))]
    sampling[1].update(top_k=5, top_p=0.9)
    plain = run(engine, 0, [request(ids, top_n_tokens=1, **s) for ids, s in zip(prompts, sampling)])
    spec = run(engine, NUM_HEADS, [request(ids, top_n_tokens=1, **s) for ids, s in zip(prompts, sampling)])
    for result, ref in zip(spec, plain):
        assert_same_tokens(result, ref)
        assert result.finish.seed == ref.finish.seed
    assert sum(num_skipped(result) for result in spec) > 0
    assert_no_blocks_held(engine)


class EdgeRecording(MedusaProposer):
    """Checks, at every call, that verified positions stay inside the slots reserved at admission."""

    def __init__(self, num_tokens):
        super().__init__(num_tokens)
        self.calls = []

    def propose(self, seq, max_tokens):
        assert len(seq.token_ids) + max_tokens <= seq.max_tokens - 1
        proposed = super().propose(seq, max_tokens)
        self.calls.append((max_tokens, len(proposed)))
        return proposed


def test_edge_of_max_total_tokens_and_cancelled_or_stopped_requests_free_every_block(engine, greedy_reference):
    """A request of exactly max_total_tokens proposes fewer guesses at its end and keeps the plain
    output; requests that finish, stop on a stop sequence, or are cancelled right after a multi-token
    step, all at once, leave no KV block behind."""
    from tgserve.checkpoints.demo_tokenizer import read_demo_corpus
    prompt = engine.tokenizer.encode(read_demo_corpus())[:512 - 23]
    (ref,) = run(engine, 0, [request(prompt, max_new_tokens=23)])
    proposer = EdgeRecording(NUM_HEADS)
    with speculating(engine, proposer):
        (got,) = run_all(engine, [request(prompt, max_new_tokens=23)])
    assert_same_tokens(got, ref)
    assert any(0 < allowed < NUM_HEADS for allowed, _ in proposer.calls), "never proposed at the edge"
    assert_no_blocks_held(engine)

    decode, ref_ids = engine.tokenizer.decode, greedy_reference[1].ids
    stop = decode(ref_ids[:8])[len(decode(ref_ids[:7])):]
    cancelled = threading.Event()

    class CancelAfterMultiStep(Collected):
        def __call__(self, event):
            super().__call__(event)
            if event.num_step_tokens > 1 and not cancelled.is_set():
                engine.cancel(self.request_id)
                cancelled.set()

    with speculating(engine, MedusaProposer(NUM_HEADS)):
        prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
        finished, stopped, cancelling = Collected(), Collected(), CancelAfterMultiStep()
        engine.submit(request(prompts[0]), finished)
        engine.submit(request(prompts[1], stop=[stop]), stopped)
        cancelling.request_id = engine.submit(request(prompts[2], max_new_tokens=200), cancelling)
        for sink in (finished, stopped):
            assert sink.done.wait(120)
        assert cancelled.wait(120), "the cancelled request never had a multi-token step"
        assert_no_blocks_held(engine)
    assert finished.finish.reason == "length" and stopped.finish.reason == "stop_sequence"
    assert not cancelling.done.is_set()


def build(model_dir, **config):
    return build_engine(ServerConfig(model_id=str(model_dir), dtype="float32", max_batch_total_tokens=4096,
                                     max_total_tokens=512, **config), BackendRegistry().select("cpu"), progress=False)


def test_speculate_above_the_head_count_fails_with_tgis_message(medusa_dir):
    with pytest.raises(ConfigError) as error:
        build(medusa_dir, speculate=NUM_HEADS + 1)
    assert str(error.value) == (f"Speculate is set to `{NUM_HEADS + 1}` but this medusa models only has "
                                f"`{NUM_HEADS}` heads, please make them match")


def test_speculate_below_the_head_count_uses_fewer_heads_and_0_none(medusa_dir):
    two = build(medusa_dir, speculate=2)
    assert (two.config.speculate, two.proposer.num_tokens, two.runner.heads.num_heads) == (2, 2, 2)
    off = build(medusa_dir, speculate=0)
    assert off.proposer is None and off.runner.heads is None and off.config.speculate == 0


def test_heads_sharing_the_model_lm_head(demo_model_dir, tmp_path_factory):
    """TGI's MedusaHeadV2 layout (no lm_head per head): same greedy ids, guesses accepted."""
    from tgserve.checkpoints.demo_medusa import write_demo_medusa
    shared = write_demo_medusa(tmp_path_factory.mktemp("medusa-shared"), demo_model_dir, str(demo_model_dir), 2,
                               shared_lm_head=True)
    with running_engine(shared, dtype="float32", max_batch_total_tokens=4096, max_total_tokens=512) as engine:
        assert engine.runner.heads.out_weights is None and engine.config.speculate == 2
        ids = [engine.tokenizer.encode(p) for p in PROMPTS]
        ref = run(engine, 0, [request(p) for p in ids])
        got = run(engine, 2, [request(p) for p in ids])
        for result, expected in zip(got, ref):
            assert_same_tokens(result, expected)
        assert mean_accepted_length(got) > 1.0


SMOLLM2_PROMPT = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
                  "Rewrite both functions with type hints:\n\ndef add(a: int, b: int) -> int:\n")


def test_smollm2_with_untrained_shared_lm_head_heads_equals_speculate_0(smollm2_dir, tmp_path):
    """The real model (tied embeddings) under two near-zero heads in TGI's MedusaHeadV2 layout: whatever
    the heads guess, --speculate 2 gives --speculate 0's ids, alone and beside a plain request."""
    from safetensors.torch import save_file
    hidden_size = json.loads((smollm2_dir / "config.json").read_text())["hidden_size"]
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for head in range(2):
        tensors[f"{head}.0.linear.weight"] = torch.randn(hidden_size, hidden_size, generator=generator) * 1e-3
        tensors[f"{head}.0.linear.bias"] = torch.zeros(hidden_size)
    save_file(tensors, str(tmp_path / "medusa_lm_head.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1,
                                                      "base_model_name_or_path": str(smollm2_dir)}))
    with running_engine(tmp_path, dtype="float32", max_batch_prefill_tokens=256, max_batch_total_tokens=4096,
                        max_total_tokens=1024) as engine:
        assert engine.runner.heads.out_weights is None and engine.config.speculate == 2
        prompt = engine.tokenizer.encode(SMOLLM2_PROMPT)
        other = engine.tokenizer.encode("The capital of France is")
        requests = lambda: [request(prompt, max_new_tokens=32), request(other, max_new_tokens=16)]  # noqa: E731
        ref = run(engine, 0, requests())
        got = run(engine, 2, requests())
        for result, expected in zip(got, ref):
            assert_same_tokens(result, expected)
        assert_no_blocks_held(engine)


def test_adaptive_lengths_over_the_heads_keep_the_output(engine, prompts, greedy_reference):
    """As served: adaptive lengths over the heads (which still get every step's guesses through the
    wrapper), concurrent, with a small knee so lengths vary; greedy ids stay --speculate 0's."""
    adaptive = AdaptiveProposer(engine.proposer, knee_rows=0.5)
    with speculating(engine, adaptive):
        got = run_all(engine, [request(ids, top_n_tokens=2) for ids in prompts])
    for result, ref in zip(got, greedy_reference):
        assert_same_tokens(result, ref)


def test_smollm2_self_distilled_heads_keep_greedy_output_and_are_accepted(smollm2_medusa_run, machine_cache_root,
                                                                           tmp_path, monkeypatch):
    """The CLI's SmolLM2 heads (`smollm2_medusa_run`) served as `--model-id DIR`: the base id resolves
    offline to the wheel-built model, and two held-out chat prompts, at once, give --speculate 0's
    greedy ids with guesses accepted. The heads' own lengths (3 every step), as the tests above: the
    test budget's heads guess right ~8% of the time, where the served adaptive rule soon stops
    guessing (test_adaptive_lengths_over_the_heads_keep_the_output runs it on the demo heads)."""
    import huggingface_hub.constants
    from tgserve.benchmark.speculation_workloads import render
    from tgserve.checkpoints.smollm2_medusa import read_medusa_prompts

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TGSERVE_CACHE", str(machine_cache_root))
    with running_engine(smollm2_medusa_run.path, dtype="float32", huggingface_hub_cache=str(tmp_path),
                        max_batch_prefill_tokens=256, max_batch_total_tokens=4096, max_total_tokens=512) as engine:
        assert engine.runner.heads.num_heads == 3 and engine.config.speculate == 3
        heldout = read_medusa_prompts()[18:20]  # trained on the first 18 of 24 (the fixture's budget)
        prompts = [engine.tokenizer.encode(render(engine.tokenizer, p), add_special_tokens=False) for p in heldout]
        ref = run(engine, 0, [request(ids, max_new_tokens=48) for ids in prompts])
        got = run(engine, 3, [request(ids, max_new_tokens=48) for ids in prompts])
        for result, expected in zip(got, ref):
            assert_same_tokens(result, expected)
        assert mean_accepted_length(got) > 1.0, "no SmolLM2 Medusa guess was ever accepted"
        assert_no_blocks_held(engine)


def test_heads_do_not_combine_with_shards_yet(medusa_dir):
    """Rank 0 of 2 refuses a Medusa checkpoint before it loads anything or talks to the other rank (the
    group object is never used: the refusal comes first)."""
    ranks = Ranks(TensorParallel(0, 2, group=object()), control_group=None, on_stopping=lambda: None)
    with pytest.raises(ConfigError, match="--num-shard does not combine with Medusa heads"):
        build_engine(ServerConfig(model_id=str(medusa_dir), dtype="float32"), BackendRegistry().select("cpu"),
                     progress=False, ranks=ranks)
