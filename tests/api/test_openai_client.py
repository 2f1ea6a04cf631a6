"""OpenAI's own `openai` client against a real `tgserve serve` process on the demo model, unchanged.

Chat and legacy completions, streamed and not, usage, logprobs, stop sequences and seeds. The demo
model answers "What is the capital of France?" with "The capital of France is Paris." greedily: the
oracle is transformers' float32 greedy decoding of the same checkpoint
(tests/core/test_demo_model.py::test_chat_answer_stops_at_im_end), and the server runs in float32 too.
"""
from __future__ import annotations

import openai
import pytest

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["Once upon a time", "The capital of France is"]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0) as client:
        yield client


def chat(client, messages=FRANCE, **params):
    return client.chat.completions.create(model=params.pop("model", "tgi"), messages=messages, **params)


def test_models_list(client, model_dir):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(str(model_dir), "model", str(model_dir))]


def _token_count(hf_tokenizer, text):
    """How many tokens transformers' tokenizer makes of `text` (no special tokens added)."""
    return len(hf_tokenizer.encode(text, add_special_tokens=False))


def test_chat_answers_the_france_question(client, hf_tokenizer):
    response = chat(client, model="any-name/at-all", temperature=0, max_tokens=30)
    choice = response.choices[0]
    assert choice.message.content == "The capital of France is Paris."
    assert choice.message.role == "assistant" and choice.finish_reason == "stop" and choice.logprobs is None
    assert response.object == "chat.completion" and response.model == "any-name/at-all"
    assert response.system_fingerprint.endswith("-native") and response.created > 0
    usage = response.usage
    # Expected count from transformers' tokenizer: the answer's tokens and the <|im_end|> that ended it.
    assert usage.prompt_tokens > 10
    assert usage.completion_tokens == _token_count(hf_tokenizer, choice.message.content) + 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_matches_and_reports_usage(client):
    whole = chat(client, temperature=0, max_tokens=30)
    chunks = list(chat(client, temperature=0, max_tokens=30, stream=True, stream_options={"include_usage": True}))
    *token_chunks, usage_chunk = chunks
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in token_chunks)
    assert "".join(c.choices[0].delta.content for c in token_chunks) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in token_chunks][-2:] == [None, "stop"]
    assert all(c.choices[0].delta.role == "assistant" for c in token_chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    without_usage = list(chat(client, temperature=0, max_tokens=2, stream=True))
    assert len(without_usage) == 2 and all(c.choices and c.usage is None for c in without_usage)


def test_chat_logprobs(client):
    response = chat(client, temperature=0, max_tokens=30, logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert "".join(t.token for t in content) == "The capital of France is Paris.<|im_end|>"
    for token in content:
        assert len(token.top_logprobs) == 2 and token.logprob <= 0.0
        assert token.top_logprobs[0].token == token.token  # greedy picks the most likely token
    streamed = list(chat(client, temperature=0, max_tokens=30, logprobs=True, stream=True))
    assert [c.choices[0].logprobs.content[0].token for c in streamed] == [t.token for t in content]


def test_chat_stop_sequence_is_kept_and_reported_as_tgi_does(client):
    response = chat(client, temperature=0, max_tokens=30, stop="France")
    assert response.choices[0].message.content == "The capital of France"
    assert response.choices[0].finish_reason == "stop_sequence"  # TGI's name, not OpenAI's "stop"
    streamed = list(chat(client, temperature=0, max_tokens=30, stop=["Paris", "France"], stream=True))
    assert streamed[-1].choices[0].finish_reason == "stop_sequence"


def test_chat_sampling_is_reproducible_with_a_seed(client):
    params = dict(temperature=1.3, top_p=1.0, seed=7, max_tokens=12, messages=[{"role": "user", "content": "Tell me"}])
    first, second = chat(client, **params), chat(client, **params)
    assert first.choices[0].message.content == second.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content for c in chat(client, stream=True, **params))
    assert streamed == first.choices[0].message.content


def test_chat_length_limit_and_max_completion_tokens(client):
    response = chat(client, temperature=0, max_completion_tokens=3)
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 3
    assert response.choices[0].message.content == "The capital of"


def test_chat_text_parts_and_continuation_of_an_assistant_message(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    assert chat(client, parts, temperature=0, max_tokens=30).choices[0].message.content == \
        "The capital of France is Paris."
    prefilled = FRANCE + [{"role": "assistant", "content": "The capital of"}]
    assert chat(client, prefilled, temperature=0, max_tokens=30).choices[0].message.content == " France is Paris."


def _prompt_tokens(hf_tokenizer, messages):
    """The prompt's token count from transformers: its chat template, then its tokenizer."""
    text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(hf_tokenizer.encode(text, add_special_tokens=False))


def test_chat_system_message_reaches_the_prompt(client, hf_tokenizer):
    # Not the template's default system text ("You are a helpful assistant."), which is there anyway.
    messages = [{"role": "system", "content": "Answer in one short word, in French please."}] + FRANCE
    with_system = chat(client, messages, temperature=0, max_tokens=2)
    without = chat(client, temperature=0, max_tokens=2)
    assert with_system.usage.prompt_tokens == _prompt_tokens(hf_tokenizer, messages)
    assert without.usage.prompt_tokens == _prompt_tokens(hf_tokenizer, FRANCE)
    assert with_system.usage.prompt_tokens != without.usage.prompt_tokens


def test_chat_frequency_penalty_lowers_the_repeated_tokens(client):
    # The greedy answer "The capital of France is Paris." repeats the question's tokens, which the penalty
    # counts (prompt and generated, as TGI). The demo model is too sure of its answer for 2.0 to change the
    # text, but the logprobs (of the processed distribution, as TGI) of those repeated tokens must fall.
    plain = chat(client, temperature=0, max_tokens=16, logprobs=True)
    penalized = chat(client, temperature=0, max_tokens=16, logprobs=True, frequency_penalty=2.0)
    plain_lp = {t.token: t.logprob for t in plain.choices[0].logprobs.content}
    penalized_lp = {t.token: t.logprob for t in penalized.choices[0].logprobs.content}
    assert plain.choices[0].message.content == "The capital of France is Paris."
    for repeated in (" capital", " France"):
        assert penalized_lp[repeated] < plain_lp[repeated], (repeated, plain_lp, penalized_lp)


def test_completions(client, hf_tokenizer):
    response = client.completions.create(model="tgi", prompt=PROMPTS, max_tokens=5, temperature=0)
    assert response.object == "text_completion" and [c.index for c in response.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") and c.logprobs is None for c in response.choices)
    single = client.completions.create(model="tgi", prompt=PROMPTS[1], max_tokens=5, temperature=0)
    assert single.choices[0].text == response.choices[1].text == " Paris."
    # Expected count from transformers' tokenizer: the text's tokens and the eos token that ended it.
    paris_tokens = _token_count(hf_tokenizer, " Paris.") + 1
    assert single.model == "tgi" and single.usage.completion_tokens == paris_tokens
    assert single.choices[0].finish_reason == "stop"  # TGI renames eos_token when not streaming
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5 + paris_tokens  # max_tokens for the first prompt


def test_completions_stream_follows_tgi(client):
    whole = client.completions.create(model="tgi", prompt=PROMPTS, max_tokens=5, temperature=0)
    chunks = list(client.completions.create(model="tgi", prompt=PROMPTS, max_tokens=5, temperature=0, stream=True))
    for index, choice in enumerate(whole.choices):
        mine = [c for c in chunks if c.choices[0].index == index]
        assert "".join(c.choices[0].text for c in mine) == choice.text
        assert [c.choices[0].finish_reason for c in mine[:-1]] == [""] * (len(mine) - 1)  # TGI's quirk
        assert mine[-1].choices[0].finish_reason in ("length", "eos_token")  # TGI's raw reason
        assert mine[-1].usage.completion_tokens == len(mine)


def test_completions_logprobs_and_echo(client):
    response = client.completions.create(model="tgi", prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert logprobs.text_offset[0] == 0 and all(len(top) <= 2 for top in logprobs.top_logprobs)
    echoed = client.completions.create(model="tgi", prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[0] + response.choices[0].text
    streamed = client.completions.create(model="tgi", prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_errors_reach_the_client(client):
    # TGI's envelope is {"error": "<message>", ...}: the client keeps the message in `body`.
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        chat(client, n=2)
    assert refused.value.body == "Input validation error: only `n` = 1 is supported. Given: 2"
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.completions.create(model="tgi", prompt="a", suffix="b")
    assert refused.value.body == "Suffix is not supported and can be achieved by preprocessing the prompt."
    with pytest.raises(openai.APIError, match="`top_p` must be > 0.0 and <= 1.0"):
        list(chat(client, top_p=1.5, stream=True))  # validated inside the stream, as TGI does
