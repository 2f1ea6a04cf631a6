"""Prefix caching through HTTP on a real server (on by default): a repeated prompt and a chat's next turn
reuse the cached K/V of their shared full blocks and answer exactly what computing them whole gives
(greedy ids; float32 logprobs within rounding), concurrent requests share one cached prefix, the
reused tokens are reported (OpenAI `usage.prompt_tokens_details.cached_tokens`, `/metrics`), and TGI's
`PREFIX_CACHING=0` turns it off.

Oracles: the same server's answer to the prompt before anything of it was cached (its first request
computes the whole prompt), and the block size (16 on the cpu backend: reuse is whole blocks, never the
prompt's last token)."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.api.metrics_scrape import is_idle, scrape, value, wait_for_metrics

BLOCK_SIZE = 16  # the cpu backend's (backends/cpu/plugin.py)
SYSTEM = ("You are a careful assistant for a small bakery. You answer questions about bread, cakes, opening "
          "hours and prices. Keep every answer short and friendly, and never invent a price you were not given. "
          "The bakery opens at seven and closes at six, every day but Monday.")
QUESTIONS = ["When do you open?", "Do you sell rye bread?", "Is there a cake for a birthday?", "Are you open Monday?"]
NEW_TOKENS = 12


def chat(url: str, messages: list[dict], max_tokens: int = NEW_TOKENS) -> dict:
    response = httpx.post(f"{url}/v1/chat/completions", json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0, "logprobs": True}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def generate(url: str, inputs: str) -> dict:
    response = httpx.post(f"{url}/generate", json={"inputs": inputs, "parameters": {
        "max_new_tokens": NEW_TOKENS, "details": True, "decoder_input_details": False}}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def tokens_of(body: dict) -> list[tuple[int, float]]:
    return [(t["id"], t["logprob"]) for t in body["details"]["tokens"]]


def assert_same_answer(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(got, want))


def cached_tokens(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_repeated_prompt_reuses_whole_blocks_and_answers_the_same(server):
    prompt = f"{SYSTEM}\nQuestion: What do you bake on Sundays?\nAnswer:"
    before, _ = scrape(server.url)
    first = generate(server.url, prompt)
    again = generate(server.url, prompt)
    assert_same_answer(tokens_of(again), tokens_of(first))
    assert again["generated_text"] == first["generated_text"]
    num_prompt = len(httpx.post(f"{server.url}/tokenize", json={"inputs": prompt}, timeout=30).json())
    after = wait_for_metrics(server.url, is_idle, "the engine idle")
    reused = value(after, "tgserve_request_cached_tokens") - value(before, "tgserve_request_cached_tokens")
    assert reused == (num_prompt - 1) // BLOCK_SIZE * BLOCK_SIZE > 0  # the second request's; the first computed all
    assert value(after, "tgserve_kv_cache_blocks_used") == 0
    assert value(after, "tgserve_kv_cache_blocks_cached") >= num_prompt // BLOCK_SIZE


def test_a_chats_next_turn_reuses_the_turn_before_and_reports_it(server):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    first = chat(server.url, messages)
    assert cached_tokens(first) % BLOCK_SIZE == 0
    messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": QUESTIONS[1]}]
    second = chat(server.url, messages)
    # The whole first turn's prompt is a prefix of the second's: all its full blocks are reused.
    assert cached_tokens(second) >= first["usage"]["prompt_tokens"] // BLOCK_SIZE * BLOCK_SIZE - BLOCK_SIZE
    assert 0 < cached_tokens(second) < second["usage"]["prompt_tokens"]
    assert cached_tokens(second) % BLOCK_SIZE == 0


def test_concurrent_requests_on_one_cached_prefix_answer_as_each_alone(server):
    """Reference: each question alone after `SYSTEM` is cached; then all at once, plus one cancelled
    mid-way, sharing the cached blocks: every answer the same, and every block back."""
    alone = {q: chat(server.url, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
             for q in QUESTIONS}
    results: dict[str, dict] = {}

    def ask(question: str) -> None:
        results[question] = chat(server.url, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])

    def ask_and_hang_up() -> None:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me a story."}],
                "max_tokens": 200, "stream": True}, timeout=120) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    break  # the first token: close the connection, cancelling the request

    threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS] + [threading.Thread(target=ask_and_hang_up)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for question in QUESTIONS:
        got, want = results[question]["choices"][0], alone[question]["choices"][0]
        assert got["message"]["content"] == want["message"]["content"]
        got_ids = [t["logprob"] for t in got["logprobs"]["content"]]
        want_ids = [t["logprob"] for t in want["logprobs"]["content"]]
        assert all(abs(a - b) < 1e-4 for a, b in zip(got_ids, want_ids))
        assert cached_tokens(results[question]) > 0
    samples = wait_for_metrics(server.url, lambda s: is_idle(s) and value(s, "tgserve_kv_cache_blocks_used") == 0,
                               "every block back after the burst")
    assert value(samples, "tgserve_kv_cache_blocks_cached") > 0


def test_prefix_caching_env_0_computes_every_prompt_whole(start_server):
    server = start_server(env={"PREFIX_CACHING": "0"})
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[2]}]
    first, again = chat(server.url, messages), chat(server.url, messages)
    assert cached_tokens(first) == cached_tokens(again) == 0
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    samples = wait_for_metrics(server.url, is_idle, "the engine idle")
    assert value(samples, "tgserve_request_cached_tokens") == 0
    assert value(samples, "tgserve_kv_cache_blocks_cached") == 0


def test_a_burst_on_a_prefix_nobody_computed_yet_computes_it_once(server):
    """Requests arriving together on a long prefix no earlier request computed: one computes it, the others
    wait for its blocks and reuse them (the scheduler holds a request whose next block a running one is
    computing) instead of each computing it whole; answers as each alone would get them."""
    system = SYSTEM.replace("bakery", "bookshop").replace("bread, cakes", "novels, atlases")  # cached by no test
    prompts = [f"{system}\nQuestion: {question}\nAnswer:" for question in QUESTIONS]
    ids = [httpx.post(f"{server.url}/tokenize", json={"inputs": p}, timeout=30).json() for p in prompts]
    shared = next(i for i, column in enumerate(zip(*ids)) if len({t["id"] for t in column}) > 1)
    assert shared > 4 * BLOCK_SIZE
    # A long prompt's prefill step first, so the burst queues up behind it and is admitted in one step.
    def long_prompt(num_words: int) -> tuple[str, int]:
        text = " ".join(f"item{i}" for i in range(num_words))
        return text, len(httpx.post(f"{server.url}/tokenize", json={"inputs": text}, timeout=30).json())

    num_words = 100
    while long_prompt(2 * num_words)[1] < 1000:  # the server takes prompts under 1024 tokens
        num_words *= 2
    blocker = threading.Thread(target=generate, args=(server.url, long_prompt(num_words)[0]))
    before, _ = scrape(server.url)
    results: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, generate(server.url, prompts[i])))
               for i in range(len(prompts))]
    blocker.start()
    time.sleep(0.02)
    for thread in threads:
        thread.start()
    for thread in [blocker, *threads]:
        thread.join(timeout=120)
    after = wait_for_metrics(server.url, is_idle, "the engine idle after the burst")
    reused = value(after, "tgserve_request_cached_tokens") - value(before, "tgserve_request_cached_tokens")
    assert reused >= (len(prompts) - 1) * (shared // BLOCK_SIZE * BLOCK_SIZE)  # all but the first reused it
    for i, prompt in enumerate(prompts):  # each again, alone, now fully cached: the same answer
        assert_same_answer(tokens_of(generate(server.url, prompt)), tokens_of(results[i]))
