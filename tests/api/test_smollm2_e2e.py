"""A real third-party checkpoint end to end: SmolLM2-135M-Instruct in a `tgserve serve` process.

Greedy token ids equal transformers' `generate` in float32, one request at a time and 8 at once,
for prompts of 1 to over 1,000 tokens that a 512-token prefill budget splits into chunks; the
openai client gets "Paris"; streaming equals not streaming; a bfloat16 server's top-5 logprobs stay
within 0.1 nats of float32 transformers on average, and so do its prompt logprobs across prefill
chunks. The transformers reference runs once per session.
"""
from __future__ import annotations

import functools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tgserve.checkpoints.demo_tokenizer import read_demo_corpus
from tests.api.conftest import ServerProcess, server_factory
from tests.api.metrics_scrape import scrape, value

MAX_NEW_TOKENS = 12
MAX_BATCH_PREFILL_TOKENS = 512  # below the longest prompt, so its prefill runs in chunks
SMOLLM2_FLAGS = ("--backend", "cpu", "--max-input-tokens", "1500", "--max-total-tokens", "1600",
                 "--max-batch-prefill-tokens", str(MAX_BATCH_PREFILL_TOKENS), "--max-batch-total-tokens", "8192")
NUM_CONCURRENT = 8
# Greedy ids are compared up to the first step whose top-2 logits transformers itself puts closer
# than this: there float32 summation order (oneDNN vs. transformers' kernels, AVX-512 vs. AVX2) may
# pick either token, and the rest of the sequence is another, equally valid, continuation.
NEAR_TIE_LOGITS = 0.01
MEAN_BF16_ERROR_NATS = 0.1  # top-5 logprobs of a bfloat16 server against float32 transformers
MAX_BF16_ERROR_NATS = 0.4
TOP_N_TOKENS = 5
BF16_PREFILL_BUDGET = 128  # the bf16 server's --max-batch-prefill-tokens: a 350-token prompt takes 3 chunks
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass(slots=True)
class Reference:
    prompt: str
    prompt_ids: list[int]  # as the checkpoint's tokenizer encodes `prompt`
    generated_ids: list[int]  # transformers' greedy continuation, float32, at most MAX_NEW_TOKENS
    top2_gaps: list[float]  # [len(generated_ids)] top-1 minus top-2 logit at each step
    logprobs: torch.Tensor  # [len(generated_ids), vocab] float32 log-softmax at each step

    def comparable_steps(self) -> int:
        """Steps before the first near tie; every one of them must match exactly."""
        return next((step for step, gap in enumerate(self.top2_gaps) if gap < NEAR_TIE_LOGITS),
                    len(self.generated_ids))


def prompts(tokenizer) -> list[str]:
    """8 prompts from 1 token to over 1,000: plain text, ChatML, and prose from the demo corpus."""
    corpus = read_demo_corpus()

    def chat(text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)

    return ["The", "Hello, my name is", chat(FRANCE[0]["content"]), corpus[:400], chat("Write a haiku about the sea."),
            corpus[1500:3000], corpus[6000:8800], corpus[:5000]]


@pytest.fixture(scope="module")
def references(smollm2_dir: Path) -> list[Reference]:
    """transformers' float32 greedy continuations of `prompts`, computed once."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    result = []
    for prompt in prompts(tokenizer):
        prompt_ids = tokenizer(prompt).input_ids
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        logits = torch.cat(out.logits).float()  # [steps, vocab]
        top2 = logits.topk(2, dim=-1).values
        result.append(Reference(prompt, prompt_ids, out.sequences[0, len(prompt_ids):].tolist(),
                                (top2[:, 0] - top2[:, 1]).tolist(), logits.log_softmax(dim=-1)))
    lengths = sorted(len(r.prompt_ids) for r in result)
    assert lengths[0] == 1 and lengths[-1] > 1000 and lengths[-1] > MAX_BATCH_PREFILL_TOKENS
    return result


@pytest.fixture(scope="module")
def start_smollm2(smollm2_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: a healthy SmolLM2 server with extra flags; all are stopped at teardown."""
    with server_factory(tmp_path_factory, *SMOLLM2_FLAGS) as start:
        yield functools.partial(start, smollm2_dir)


@pytest.fixture(scope="module")
def server(start_smollm2) -> ServerProcess:
    return start_smollm2("--dtype", "float32")


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


def generate(client: httpx.Client, prompt: str, **parameters) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "details": True, **parameters}}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def assert_matches(reference: Reference, response: dict) -> None:
    ids = [token["id"] for token in response["details"]["tokens"]]
    steps = reference.comparable_steps()
    assert ids[:steps] == reference.generated_ids[:steps], f"prompt of {len(reference.prompt_ids)} tokens"
    if steps == len(reference.generated_ids):
        assert ids == reference.generated_ids


def test_the_server_tokenizes_as_transformers(client, references):
    for reference in references:
        response = client.post("/tokenize", json={"inputs": reference.prompt})
        assert [token["id"] for token in response.json()] == reference.prompt_ids


def test_greedy_ids_equal_transformers_one_request_at_a_time(client, references):
    for reference in references:
        assert_matches(reference, generate(client, reference.prompt))


def test_greedy_ids_equal_transformers_with_8_concurrent_requests(client, references):
    assert len(references) == NUM_CONCURRENT
    with ThreadPoolExecutor(NUM_CONCURRENT) as pool:
        responses = list(pool.map(lambda r: generate(client, r.prompt), references))
    for reference, response in zip(references, responses):
        assert_matches(reference, response)


def test_openai_chat_answers_paris_and_streams_the_same_text(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300, max_retries=0) as client:
        params = dict(model="tgi", messages=FRANCE, temperature=0, max_tokens=20)
        answer = client.chat.completions.create(**params).choices[0].message.content
        streamed = "".join(chunk.choices[0].delta.content or ""
                           for chunk in client.chat.completions.create(stream=True, **params))
    assert "Paris" in answer
    assert streamed == answer


def test_generate_stream_equals_generate(client, references):
    prompt = references[3].prompt
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW_TOKENS}}
    with client.stream("POST", "/generate_stream", json=body) as stream:
        events = [json.loads(line[len("data:"):]) for line in stream.iter_lines() if line.startswith("data:")]
    streamed = "".join(event["token"]["text"] for event in events if not event["token"]["special"])
    assert streamed == events[-1]["generated_text"] == generate(client, prompt)["generated_text"]
    assert len(events) == MAX_NEW_TOKENS or events[-1]["details"]["finish_reason"] == "eos_token"


@pytest.fixture(scope="module")
def bf16_server(start_smollm2) -> ServerProcess:
    """bfloat16, prompt logprobs on, and a prefill budget that splits a few hundred tokens into chunks."""
    return start_smollm2("--dtype", "bfloat16", "--enable-prefill-logprobs",
                         "--max-batch-prefill-tokens", str(BF16_PREFILL_BUDGET))


def test_bfloat16_top5_logprobs_are_within_a_tenth_of_a_nat_of_float32(bf16_server, references):
    """Mean error of the top-5 logprobs under 0.1 nats, and no single one off by more than 0.4.

    Not every one under 0.1: bf16 moves the tail of the top 5 (logprobs near -5) by up to 0.18 nats in
    transformers' own one-forward bf16 run of these prompts (mean 0.03-0.05) and by up to 0.22 in its
    bf16 decode with a KV cache (AMD Zen 5, AVX512-BF16 without AMX); tgserve's bf16 decode differs from
    that by one bf16 step of a logit (0.125 at logits 16-32), up to 0.34 in all on that CPU.
    """
    bf16 = bf16_server
    errors = []
    with httpx.Client(base_url=bf16.url, timeout=300) as client:
        for reference in (references[2], references[3], references[7]):
            details = generate(client, reference.prompt, top_n_tokens=TOP_N_TOKENS)["details"]
            ids = [token["id"] for token in details["tokens"]]
            # Compare where bf16 followed float32's path (a near tie may send it elsewhere), at least one step.
            steps = next((i for i, (a, b) in enumerate(zip(ids, reference.generated_ids)) if a != b), len(ids))
            assert steps >= 1
            for step in range(steps):
                top = details["top_tokens"][step]
                expected = reference.logprobs[step]
                assert len(top) == TOP_N_TOKENS and top[0]["id"] == ids[step] == expected.argmax().item()
                errors += [abs(token["logprob"] - expected[token["id"]].item()) for token in top]
                best = torch.tensor(sorted((t["logprob"] for t in top), reverse=True))
                assert torch.allclose(best, expected.topk(TOP_N_TOKENS).values, atol=MAX_BF16_ERROR_NATS, rtol=0)
    mean_error = sum(errors) / len(errors)
    assert mean_error < MEAN_BF16_ERROR_NATS and max(errors) < MAX_BF16_ERROR_NATS, (mean_error, max(errors))


def test_bfloat16_chunked_prefill_logprobs_stay_near_float32_transformers(bf16_server, smollm2_dir):
    """Oracle: transformers' float32 log_softmax over the whole prompt in one forward (no chunks).

    The bf16 server prefills ~350 prompt tokens in 3 chunks of 128 (counted on /metrics) and reports
    every prompt token's logprob (`decoder_input_details`). Tolerance: mean error under 0.1 nats in
    every chunk, none over 0.5. Measured on this prompt, transformers' own bf16 forward is off by
    0.032 nats on average and 0.21 at most, and the server by 0.032 and 0.16 (AVX-512 and the forced
    AVX2 path alike); a token read from the wrong position or a chunk attending to shifted keys is
    off by nats, not tenths.
    """
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = read_demo_corpus()[:1500]
    prompt_ids = tokenizer(prompt).input_ids
    chunks = -(-len(prompt_ids) // BF16_PREFILL_BUDGET)
    assert chunks >= 3
    before = value(scrape(bf16_server.url)[0], "tgi_batch_inference_count", method="prefill")
    with httpx.Client(base_url=bf16_server.url, timeout=300) as client:
        details = generate(client, prompt, max_new_tokens=1, decoder_input_details=True)["details"]
    assert value(scrape(bf16_server.url)[0], "tgi_batch_inference_count", method="prefill") - before == chunks
    prefill = details["prefill"]
    assert [token["id"] for token in prefill] == prompt_ids and prefill[0]["logprob"] is None
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0].float(), dim=-1)
    expected = reference[:-1].gather(1, torch.tensor(prompt_ids[1:]).unsqueeze(1)).squeeze(1)
    errors = (torch.tensor([token["logprob"] for token in prefill[1:]]) - expected).abs()
    # errors[i] is the logprob of token i + 1, computed at position i: chunk c holds positions [128c, 128c + 128).
    for start in range(0, len(errors), BF16_PREFILL_BUDGET):
        chunk = errors[start:start + BF16_PREFILL_BUDGET]
        assert chunk.mean() < MEAN_BF16_ERROR_NATS and chunk.max() < 0.5, (start, chunk.mean(), chunk.max())
