"""Hugging Face's own `text_generation` client against a real server, unchanged.

The client posts to `/` (the compat route), parses SSE by stripping `data:`, and maps the error
envelope's `error_type` to its exception classes; all three have to match TGI for it to work.
"""
from __future__ import annotations

import asyncio
import re

import httpx
import pytest
import text_generation  # installed --no-deps by scripts/test.sh, from tests/no-deps-requirements.txt
from text_generation.errors import ValidationError

PROMPT = "Once upon a time"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client calls pydantic's .dict()


@pytest.fixture(scope="module")
def client(server):
    return text_generation.Client(server.url, timeout=120)


def test_generate(client):
    response = client.generate(PROMPT, max_new_tokens=10, top_n_tokens=2, decoder_input_details=True)
    details = response.details
    assert response.generated_text
    assert details.finish_reason.value in ("length", "eos_token") and details.generated_tokens == len(details.tokens)
    assert details.prefill == []  # the server was not started with --enable-prefill-logprobs
    assert len(details.top_tokens) == details.generated_tokens
    assert "".join(t.text for t in details.tokens if not t.special) == response.generated_text


def test_generate_stream_matches_generate(client):
    responses = list(client.generate_stream(PROMPT, max_new_tokens=10))
    assert responses[-1].details.generated_tokens == len(responses)
    assert all(r.generated_text is None for r in responses[:-1])
    text = "".join(r.token.text for r in responses if not r.token.special)
    assert text == responses[-1].generated_text == client.generate(PROMPT, max_new_tokens=10).generated_text


def test_sampling_with_a_seed(client):
    first = client.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=7, temperature=0.8, top_p=0.95)
    second = client.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=7, temperature=0.8, top_p=0.95)
    assert first.details.seed == 7 and first.generated_text == second.generated_text


def test_errors_map_to_the_client_exceptions(client, server, hf_tokenizer):
    max_total_tokens = httpx.get(f"{server.url}/info", timeout=30).json()["max_total_tokens"]
    input_tokens = len(hf_tokenizer.encode(PROMPT))  # the prompt's length from transformers' tokenizer
    # The whole message TGI sends (validation of inputs + max_new_tokens against --max-total-tokens).
    message = (f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {max_total_tokens}. "
               f"Given: {input_tokens} `inputs` tokens and 5000 `max_new_tokens`")
    with pytest.raises(ValidationError, match=f"^{re.escape(message)}$"):
        client.generate(PROMPT, max_new_tokens=5000)
    with pytest.raises(ValidationError, match=f"^{re.escape(message)}$"):
        list(client.generate_stream(PROMPT, max_new_tokens=5000))  # arrives as an event in an HTTP 200


def test_async_client(server):
    async def run() -> tuple[str, str]:
        client = text_generation.AsyncClient(server.url, timeout=120)
        response = await client.generate(PROMPT, max_new_tokens=6)
        streamed = [r async for r in client.generate_stream(PROMPT, max_new_tokens=6)]
        return response.generated_text, streamed[-1].generated_text

    generated, streamed = asyncio.run(run())
    assert generated == streamed
