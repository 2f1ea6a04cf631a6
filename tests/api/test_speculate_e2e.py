"""`tgserve serve --speculate 2` (the seed's command) end to end on the demo model: TGI's start-up
line, `/info`, a streamed request whose n-gram guesses are accepted (several token events from one
step, one SSE event per token) with transformers' float32 greedy ids as the oracle, the official
client, OpenAI's client, `tgi_request_skipped_tokens` counting what speculation gained, and each
accepted token's logprob and top tokens equal to what a `--speculate 0` server reports."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import text_generation  # installed --no-deps by scripts/test.sh, from tests/no-deps-requirements.txt
import torch
from transformers import AutoModelForCausalLM

from .metrics_scrape import is_released, scrape, value, wait_for_metrics

# Repeats its own text, so the output copies the prompt and n-gram guesses are accepted.
PROMPT = "The river ran past the mill. The river ran past the mill. The river ran"
NEW_TOKENS = 40
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client calls pydantic's .dict()


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--speculate", "2")


@pytest.fixture(scope="module")
def plain_server(start_server):
    return start_server("--speculate", "0")


@pytest.fixture(scope="module")
def greedy_ids(model_dir, hf_tokenizer) -> list[int]:
    """transformers' float32 greedy continuation of PROMPT (stopping at eos, as the server does)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = hf_tokenizer(PROMPT).input_ids
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=hf_tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def stream_events(url: str, **params) -> list[dict]:
    """POST /generate_stream and parse every `data:` event."""
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS, **params}}
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=120) as response:
        assert response.status_code == 200
        return [json.loads(line[len("data:"):]) for line in response.iter_lines() if line.startswith("data:")]


def test_startup_line_and_info(server):
    assert "Using speculation n-gram with 2 input ids." in server.log()
    assert httpx.get(f"{server.url}/info", timeout=10).json()["speculate"] == 2


def test_stream_emits_each_accepted_token_and_equals_greedy(server, greedy_ids):
    before, _ = scrape(server.url)
    events = stream_events(server.url, details=True, top_n_tokens=2)
    assert [e["token"]["id"] for e in events] == greedy_ids
    assert events[-1]["details"]["generated_tokens"] == len(events) == len(greedy_ids)
    assert all(len(e["top_tokens"]) == 2 for e in events)
    after = wait_for_metrics(server.url, is_released, "the request released its KV blocks")
    # One observation per step that gave the request tokens, each the tokens less one: fewer steps
    # than tokens, and the difference is what the guesses gained.
    num_steps = value(after, "tgi_request_skipped_tokens_count") - value(before, "tgi_request_skipped_tokens_count")
    gained = value(after, "tgi_request_skipped_tokens_sum") - value(before, "tgi_request_skipped_tokens_sum")
    assert gained > 0 and num_steps + gained == len(events)
    assert value(after, "tgi_request_skipped_tokens_bucket", le="2.0") == value(after, "tgi_request_skipped_tokens_count")


def test_official_client_stream_matches_generate(server, greedy_ids):
    client = text_generation.Client(server.url, timeout=120)
    responses = list(client.generate_stream(PROMPT, max_new_tokens=NEW_TOKENS))
    assert [r.token.id for r in responses] == greedy_ids
    generated = client.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert responses[-1].generated_text == generated.generated_text
    assert [t.id for t in generated.details.tokens] == greedy_ids
    seeded = [client.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=True, seed=11, temperature=0.5).generated_text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_logprobs_and_top_tokens_equal_speculate_0(server, plain_server, greedy_ids):
    """Tokens accepted from a verification step report what one-token decoding reports: the same
    top tokens and logprobs (float32; the two compute the same positions in differently shaped
    forwards, so equal within 1e-4, not bit for bit)."""
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True, "top_n_tokens": 3,
                                             "decoder_input_details": True}}
    spec, plain = (httpx.post(f"{s.url}/generate", json=body, timeout=120).json()["details"]
                   for s in (server, plain_server))
    assert [t["id"] for t in spec["tokens"]] == [t["id"] for t in plain["tokens"]] == greedy_ids
    for got, want in zip(spec["tokens"] + spec["prefill"][1:], plain["tokens"] + plain["prefill"][1:]):
        assert got["logprob"] == pytest.approx(want["logprob"], abs=1e-4)
    for got, want in zip(spec["top_tokens"], plain["top_tokens"]):
        assert [t["id"] for t in got] == [t["id"] for t in want]
        assert [t["logprob"] for t in got] == pytest.approx([t["logprob"] for t in want], abs=1e-4)


def test_openai_chat_stream_equals_speculate_0(server, plain_server):
    """OpenAI's own client, streamed chat with logprobs: the speculating server's chunks, joined,
    and their logprobs equal the plain server's answer (several tokens may come from one step, each
    still its own chunk)."""
    messages = [{"role": "user", "content": PROMPT}]
    answers = []
    for s in (server, plain_server):
        with openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", timeout=120, max_retries=0) as client:
            chunks = list(client.chat.completions.create(model="tgi", messages=messages, temperature=0,
                                                         max_tokens=NEW_TOKENS, stream=True, logprobs=True))
        assert all(len(c.choices[0].logprobs.content) == 1 for c in chunks if c.choices[0].delta.content)
        answers.append(("".join(c.choices[0].delta.content or "" for c in chunks),
                        [c.choices[0].logprobs.content[0].logprob for c in chunks if c.choices[0].delta.content]))
    (spec_text, spec_logprobs), (plain_text, plain_logprobs) = answers
    assert spec_text == plain_text and len(spec_text) > 0
    assert spec_logprobs == pytest.approx(plain_logprobs, abs=1e-4)
