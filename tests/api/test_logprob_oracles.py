"""Logprobs and penalties of a real float32 demo-model server against Hugging Face transformers.

One `tgserve serve` process (float32, `--enable-prefill-logprobs`, a 16-token prefill budget so every
prompt here is prefilled in several chunks) answers over HTTP; the oracle is transformers' float32
forward of the same checkpoint (`model_dir`): its log_softmax, its `generate` with its own logits
processors, or a brute-force loop in this file where transformers has no processor (TGI's frequency
penalty). Float32 on both sides, so ids are equal and logprobs agree to 1e-4 nats.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, RepetitionPenaltyLogitsProcessor

from tests.api.metrics_scrape import scrape, value

PREFILL_BUDGET = 16  # --max-batch-prefill-tokens: every prompt below takes several chunks
TOLERANCE = 1e-4  # nats; float32 paged attention against transformers' sdpa (as tests/core/test_long_context.py)
POWER = 1e-3  # a wrong reference must differ from the right one by more than this somewhere
LONG_PROMPT = ("Once upon a time there was a small garden behind the old house, and every morning the river ran "
               "past the lighthouse on the rock while the children counted numbers: 1, 2, 3, 4, 5.")
GARDEN = "Once upon a time there was a small garden behind the old house, and every morning the river ran past " \
         "the lighthouse"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--dtype", "float32", "--max-batch-prefill-tokens", str(PREFILL_BUDGET),
                        "--enable-prefill-logprobs")


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def eos_ids(hf_model) -> set[int]:
    eos = hf_model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """transformers' float32 log_softmax [len(ids), vocab]: row i is the distribution of token i + 1."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def generate(client: httpx.Client, prompt: str, **parameters) -> dict:
    body = {"inputs": prompt, "parameters": {"details": True, **parameters}}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()["details"]


def assert_top_n(got: list[tuple[int, float]], row: torch.Tensor, n: int) -> None:
    """`got` [(id, logprob)] is transformers' top-n of `row` in descending order, each id's own logprob.

    Ties: the values are compared rank by rank and every id must carry the value transformers gives
    it, so ids of equal logprob may come in either order, but a token outside the top n cannot pass.
    """
    assert len(got) == n and len({token for token, _ in got}) == n, got
    for (token, logprob), expected in zip(got, row.topk(n).values.tolist()):
        assert abs(logprob - expected) < TOLERANCE, (got, row.topk(n))
        assert abs(logprob - row[token].item()) < TOLERANCE, (token, logprob, row[token].item())


def chat_prompt_ids(hf_tokenizer) -> list[int]:
    """The ids of FRANCE under the checkpoint's chat template, as transformers renders it."""
    ids = hf_tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def prefill_steps(server) -> float:
    return value(scrape(server.url)[0], "tgi_batch_inference_count", method="prefill")


# --- 1. prompt logprobs (decoder_input_details) across chunk boundaries --------------------------------

def test_prefill_logprobs_equal_transformers_across_chunks(server, client, hf_model, hf_tokenizer):
    """Oracle: transformers' float32 log_softmax of the whole prompt in one forward (no chunks), token
    i's logprob read from row i - 1; the first token has none (TGI: null). /metrics proves the server
    prefilled the prompt in ceil(len / 16) > 1 steps, so the positions cross chunk boundaries."""
    prompt_ids = hf_tokenizer(LONG_PROMPT).input_ids
    chunks = math.ceil(len(prompt_ids) / PREFILL_BUDGET)
    assert chunks >= 3
    before = prefill_steps(server)
    details = generate(client, LONG_PROMPT, max_new_tokens=1, decoder_input_details=True)
    assert prefill_steps(server) - before == chunks
    prefill = details["prefill"]
    assert [token["id"] for token in prefill] == prompt_ids
    assert prefill[0]["logprob"] is None
    reference = hf_logprobs(hf_model, prompt_ids)
    errors = [abs(token["logprob"] - reference[i - 1, token["id"]].item()) for i, token in enumerate(prefill) if i]
    assert max(errors) < TOLERANCE, max(errors)
    # The generated token continues the same distribution: row len - 1.
    first = details["tokens"][0]
    assert first["id"] == reference[-1].argmax().item()
    assert abs(first["logprob"] - reference[-1, first["id"]].item()) < TOLERANCE


# --- 2. generated-token and top-n logprobs -------------------------------------------------------------

def test_generated_and_top_n_logprobs_equal_transformers(client, hf_model, hf_tokenizer):
    """Oracle: transformers' greedy `generate` (float32) gives the ids; its log_softmax over the prompt
    and those ids gives each step's logprob and top-5 (`assert_top_n` handles ties)."""
    prompt_ids = hf_tokenizer(GARDEN).input_ids
    with torch.inference_mode():
        expected_ids = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False)[0].tolist()
    details = generate(client, GARDEN, max_new_tokens=10, top_n_tokens=5)
    tokens = details["tokens"]
    assert [t["id"] for t in tokens] == expected_ids[len(prompt_ids):]
    reference = hf_logprobs(hf_model, expected_ids)[len(prompt_ids) - 1:]
    for step, (token, top) in enumerate(zip(tokens, details["top_tokens"], strict=True)):
        assert abs(token["logprob"] - reference[step, token["id"]].item()) < TOLERANCE
        assert_top_n([(t["id"], t["logprob"]) for t in top], reference[step], 5)


def test_openai_logprobs_and_top_logprobs_equal_transformers(client, hf_model, hf_tokenizer, eos_ids):
    """Oracle: transformers' greedy `generate` (float32) on the chat template's ids and on the plain
    prompt; each token's text is the tokenizer's decoding of transformers' id, its logprob and top
    alternatives (values in order, each alternative's text one of the ids with that logprob) are
    transformers' log_softmax."""
    prompt_ids = chat_prompt_ids(hf_tokenizer)
    with torch.inference_mode():
        full = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False)[0].tolist()
    generated = full[len(prompt_ids):]
    reference = hf_logprobs(hf_model, full)[len(prompt_ids) - 1:]
    response = client.post("/v1/chat/completions", json={"model": "tgi", "messages": FRANCE, "temperature": 0,
                                                          "max_tokens": 12, "logprobs": True, "top_logprobs": 3})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == len(generated) and generated[-1] in eos_ids  # the answer ends with eos
    for step, (entry, token_id) in enumerate(zip(content, generated)):
        row = reference[step]
        assert entry["token"] == hf_tokenizer.decode([token_id]), step
        assert abs(entry["logprob"] - row[token_id].item()) < TOLERANCE
        top_values = row.topk(3).values.tolist()
        assert len(entry["top_logprobs"]) == 3
        for alternative, expected in zip(entry["top_logprobs"], top_values):
            assert abs(alternative["logprob"] - expected) < TOLERANCE
            same_value = (row - alternative["logprob"]).abs() < TOLERANCE
            texts = {hf_tokenizer.decode([i]) for i in same_value.nonzero().flatten().tolist()}
            assert alternative["token"] in texts, (alternative, texts)
    assert choice["message"]["content"] == hf_tokenizer.decode(generated, skip_special_tokens=True)

    # /v1/completions' legacy logprobs object: token_logprobs and the top-3 values.
    plain_ids = hf_tokenizer(GARDEN).input_ids
    with torch.inference_mode():
        full = hf_model.generate(torch.tensor([plain_ids]), max_new_tokens=6, do_sample=False)[0].tolist()
    reference = hf_logprobs(hf_model, full)[len(plain_ids) - 1:]
    response = client.post("/v1/completions", json={"model": "tgi", "prompt": GARDEN, "temperature": 0,
                                                    "max_tokens": 6, "logprobs": 3})
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [hf_tokenizer.decode([i]) for i in full[len(plain_ids):]]
    for step, (token_id, logprob, top) in enumerate(zip(full[len(plain_ids):], logprobs["token_logprobs"],
                                                        logprobs["top_logprobs"], strict=True)):
        assert abs(logprob - reference[step, token_id].item()) < TOLERANCE
        got = sorted(top.values(), reverse=True)
        assert len(got) == 3 and max(abs(a - b) for a, b in zip(got, reference[step].topk(3).values.tolist())) < TOLERANCE


# --- 3. repetition and frequency penalties -------------------------------------------------------------

def greedy_with(model, prompt_ids: list[int], process: Callable[[list[int], torch.Tensor], torch.Tensor],
                max_new_tokens: int, eos_ids: set[int]) -> tuple[list[int], list[float]]:
    """Brute-force greedy decoding: a full float32 forward per step, `process(ids so far, logits)`,
    argmax; returns the generated ids and their logprobs under the processed distribution (TGI's)."""
    ids, logprobs = list(prompt_ids), []
    for _ in range(max_new_tokens):
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        processed = torch.log_softmax(process(ids, logits), dim=-1)
        token = int(processed.argmax())
        ids.append(token)
        logprobs.append(processed[token].item())
        if token in eos_ids:
            break
    return ids[len(prompt_ids):], logprobs


def tgi_frequency_penalty(penalty: float, counted_from: int = 0):
    """TGI's HeterogeneousFrequencyPenaltyLogitsProcessor, written out: logit -= penalty * count / length
    over the ids seen so far (prompt + generated for a request alone). `counted_from` > 0 drops the
    prompt: the wrong reading this test must tell apart."""
    def process(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        counted = ids[counted_from:]
        if not counted:
            return logits
        return logits - penalty * torch.bincount(torch.tensor(counted), minlength=logits.shape[0]) / len(counted)
    return process


def assert_power(right: tuple[list[int], list[float]], wrong: tuple[list[int], list[float]]) -> None:
    """The right reference and a wrong reading of the penalty must differ, or the comparison proves nothing."""
    assert right[0] != wrong[0] or max(abs(a - b) for a, b in zip(right[1], wrong[1])) > POWER


def test_repetition_penalty_equals_transformers_generate_with_the_prompt_counted(client, hf_model, hf_tokenizer,
                                                                                 eos_ids):
    """Oracle: transformers `generate(repetition_penalty=1.3, do_sample=False)` (its
    RepetitionPenaltyLogitsProcessor over prompt + generated ids, as TGI's) gives the ids, and its
    processed scores the logprobs (TGI reports the processed distribution). Prompt tokens count:
    a brute-force reference penalizing generated tokens only differs, and the server matches
    transformers, not it."""
    penalty, prompt_ids = 1.3, hf_tokenizer(GARDEN).input_ids
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False,
                                repetition_penalty=penalty, output_scores=True, return_dict_in_generate=True)
    expected = out.sequences[0, len(prompt_ids):].tolist()
    expected_logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, expected)]
    processor = RepetitionPenaltyLogitsProcessor(penalty)

    def on_generated_only(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        generated = ids[len(prompt_ids):]
        return processor(torch.tensor([generated]), logits[None].clone())[0] if generated else logits

    generated_only = greedy_with(hf_model, prompt_ids, on_generated_only, 12, eos_ids)
    assert_power((expected, expected_logprobs), generated_only)
    tokens = generate(client, GARDEN, max_new_tokens=12, repetition_penalty=penalty)["tokens"]
    assert [t["id"] for t in tokens] == expected
    assert max(abs(t["logprob"] - e) for t, e in zip(tokens, expected_logprobs)) < TOLERANCE


def test_frequency_penalty_equals_tgis_definition_with_the_prompt_counted(client, hf_model, hf_tokenizer, eos_ids):
    """Oracle: `greedy_with(tgi_frequency_penalty)`, transformers' float32 forward plus TGI's frequency
    penalty written out (transformers `generate` has no such processor): penalty * count / length
    over prompt + generated ids. A generated-only reading and OpenAI's raw count must differ from it;
    /generate (2.0) and /v1/chat/completions (-1.5; it passes `frequency_penalty` through) match it."""
    penalty, prompt_ids = 2.0, hf_tokenizer(GARDEN).input_ids
    expected = greedy_with(hf_model, prompt_ids, tgi_frequency_penalty(penalty), 12, eos_ids)
    assert_power(expected, greedy_with(hf_model, prompt_ids, tgi_frequency_penalty(penalty, len(prompt_ids)), 12,
                                       eos_ids))
    assert_power(expected, greedy_with(
        hf_model, prompt_ids,
        lambda ids, logits: logits - penalty * torch.bincount(torch.tensor(ids), minlength=logits.shape[0]), 12,
        eos_ids))
    tokens = generate(client, GARDEN, max_new_tokens=12, frequency_penalty=penalty)["tokens"]
    assert [t["id"] for t in tokens] == expected[0]
    assert max(abs(t["logprob"] - e) for t, e in zip(tokens, expected[1], strict=True)) < TOLERANCE

    penalty, chat_ids = -1.5, chat_prompt_ids(hf_tokenizer)
    expected = greedy_with(hf_model, chat_ids, tgi_frequency_penalty(penalty), 8, eos_ids)
    response = client.post("/v1/chat/completions", json={"model": "tgi", "messages": FRANCE, "temperature": 0,
                                                          "max_tokens": 8, "logprobs": True,
                                                          "frequency_penalty": penalty})
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == [hf_tokenizer.decode([i]) for i in expected[0]]
    assert max(abs(entry["logprob"] - e) for entry, e in zip(content, expected[1], strict=True)) < TOLERANCE
