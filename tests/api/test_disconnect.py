"""A client hanging up cancels its requests in the real engine, over HTTP, on the demo model.

One `tgserve serve` (module-scoped) with `--max-concurrent-requests 2`. Each test starts a request
far longer than it will be allowed to run (`LONG` new tokens), hangs up (closing a stream after
its first event, or a client timeout for a non-streaming request), then polls /metrics until the
engine is empty and `tgserve_kv_cache_blocks_used` (read from the block manager) is 0 again. The
poll's timeout only bounds a hang: what shows the cancellation is the count of decode steps the
engine ran meanwhile, fewer than the `LONG - 1` that running the request(s) to their end takes.
Last, a two-prompt /v1/completions (which takes both permits) must succeed: every permit came back.

Every request here is greedy (/v1/completions samples unless `temperature` is 0; best_of needs
sampling, so it samples with `top_k` 1): sampled, the demo model now and then draws its eos token
within the first tokens (7 of 120 sampled prompts ended within 50 tokens, one after 3), and a prompt
that ends before its client hangs up ran to its end, a success and rightly not `dropped`. Waiting for
both prompts to be dropped then timed out (one CI failure, and 1 in 40 runs on a loaded 2-core box,
where the log showed one prompt's "Success" after 19 tokens). Greedy, both prompts run to `LONG`.
That window is tested on purpose, made certain: a first prompt that ends (eos) before the hang-up.

Chat streams go through the same `RequestLifecycle.stream` as completions; they have no test of their own
because the demo model ends every chat answer with its eos token within tens of tokens, so a chat
request cut by the hang-up could not be told from one that ran to its end.
"""
from __future__ import annotations

import httpx
import openai
import pytest

from .metrics_scrape import (is_released, num_decode_steps, num_dropped, num_succeeded, num_used_kv_blocks, scrape,
                             wait_for_metrics)

LONG = 2000  # new tokens each request asks for; the demo model does not stop this prompt early
PROMPT = "Once upon a time"
# Greedy, the demo model answers this ChatML question in a few tokens and ends with its eos token.
CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
CLIENT_TIMEOUT_S = 1.0  # a non-streaming client gives up after this; the request is still generating


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--max-concurrent-requests", "2")


@pytest.fixture
def before(server):
    """/metrics before the test's request: an idle engine holding no KV blocks."""
    samples, _ = scrape(server.url)
    assert is_released(samples)
    return samples


def assert_cancelled(server, before, num_requests: int, num_finished: int = 0) -> None:
    """The engine dropped `num_requests` requests before their end and freed their blocks, the
    `num_finished` that ended before the hang-up are successes, and both permits are back."""
    def num_ended(samples) -> tuple[float, float]:  # (dropped, succeeded) since `before`
        return num_dropped(samples) - num_dropped(before), num_succeeded(samples) - num_succeeded(before)

    after = wait_for_metrics(server.url, lambda s: is_released(s) and sum(num_ended(s)) == num_requests + num_finished,
                             "every hung-up request ended (dropped or finished) and its KV blocks were freed")
    assert num_ended(after) == (num_requests, num_finished)
    assert num_used_kv_blocks(after) == 0
    assert num_decode_steps(after) - num_decode_steps(before) < LONG - 1  # cut short, not run to the end
    again = httpx.post(f"{server.url}/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2}, timeout=120)
    assert again.status_code == 200, again.text  # two permits: none was kept by a dropped request


@pytest.fixture(scope="module")
def openai_client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=120) as client:
        yield client


def test_closing_a_generate_stream_cancels_it(server, before):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": LONG}}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        with client.stream("POST", "/generate_stream", json=body) as stream:
            assert next(stream.iter_lines()).startswith("data:{")
    assert_cancelled(server, before, 1)


def test_a_generate_client_timing_out_cancels_it(server, before):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": LONG}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/generate", json=body, timeout=CLIENT_TIMEOUT_S)
    assert_cancelled(server, before, 1)


def test_a_best_of_client_timing_out_cancels_every_candidate(server, before):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": LONG, "best_of": 2, "do_sample": True, "top_k": 1}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/generate", json=body, timeout=CLIENT_TIMEOUT_S)
    assert_cancelled(server, before, 1)  # one request in the metrics; both candidates must leave the engine


def test_closing_a_two_prompt_completions_stream_cancels_both(openai_client, server, before):
    stream = openai_client.completions.create(model="tgi", prompt=[PROMPT, "The cat"], max_tokens=LONG, temperature=0,
                                              stream=True)
    next(iter(stream))
    stream.close()
    assert_cancelled(server, before, 2)


def test_a_prompt_that_ended_before_the_hang_up_is_a_success_and_only_the_other_is_dropped(openai_client, server,
                                                                                           before):
    """The window the sampled tests hit now and then, made certain: the first prompt ends (eos)
    while the second still generates, then the client hangs up. The first ran to its end: one
    success; only the second is dropped and cut short."""
    stream = openai_client.completions.create(model="tgi", prompt=[CHAT_PROMPT, PROMPT], max_tokens=LONG,
                                              temperature=0, stream=True)
    finish_reasons = {}
    for chunk in stream:
        choice = chunk.choices[0]
        finish_reasons[choice.index] = choice.finish_reason
        if finish_reasons.get(0):
            break
    stream.close()
    assert finish_reasons == {0: "eos_token", 1: ""}  # TGI's raw reason when streaming; the second runs on
    assert_cancelled(server, before, 1, num_finished=1)


def test_a_two_prompt_completions_client_timing_out_cancels_both(openai_client, server, before):
    with pytest.raises(openai.APITimeoutError):
        openai_client.completions.create(model="tgi", prompt=[PROMPT, "The cat"], max_tokens=LONG, temperature=0,
                                         timeout=CLIENT_TIMEOUT_S)
    assert_cancelled(server, before, 2)

