"""Text-level behaviours over HTTP on a float32 demo-model server: stop sequences and UTF-8.

Oracles, both independent of tgserve: transformers' float32 greedy ids for the same prompts (computed
once for the module), decoded with transformers' tokenizer; and `brute_force_cut`, which decodes every
prefix of those ids and stops at the first whose text contains a stop. The demo model continues
"The baker smiled" with emoji and accented letters whose UTF-8 bytes byte-level BPE splits across
tokens, and a chat answer that continues "我喜欢读书，" with split CJK characters.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

PROMPT = "The baker smiled"
NUM_TOKENS = 90  # about 300 characters of greedy text: room for a stop longer than 256 characters
NUM_STOP_TOKENS = 24  # what the requests with short stops may generate
CHAT = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "我喜欢读书，"}]
NUM_CHAT_TOKENS = 16
NUM_UTF8_TOKENS = 24  # the first tokens of PROMPT's continuation: 😊, 🥖, é, ï, each split across tokens
# Below this top-1/top-2 logit gap float32 summation order could pick either token; the references
# are chosen to stay well above it, so the server must reproduce them exactly.
MIN_TOP2_GAP = 0.05
REPLACEMENT = "\ufffd"  # what the tokenizer decodes an incomplete UTF-8 character to


@dataclass(slots=True)
class Reference:
    prompt_text: str  # the text the server tokenizes (the chat template already applied for CHAT)
    ids: list[int]  # transformers' float32 greedy continuation


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--dtype", "float32")


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def greedy(model, tokenizer, text: str, num_tokens: int, add_special_tokens: bool = True) -> list[int]:
    prompt_ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=num_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    top2 = torch.cat(out.logits).float().topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > MIN_TOP2_GAP, "the reference has a near tie: pick another prompt"
    ids = out.sequences[0, len(prompt_ids):].tolist()
    assert len(ids) == num_tokens, "the reference reached EOS early"
    return ids


@pytest.fixture(scope="module")
def references(model_dir: Path, hf_tokenizer) -> dict[str, Reference]:
    """transformers' float32 greedy ids: PROMPT as /generate sends it, CHAT as its chat template renders it
    (the final assistant message continued, as TGI does)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chat_text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, continue_final_message=True)
    return {"raw": Reference(PROMPT, greedy(model, hf_tokenizer, PROMPT, NUM_TOKENS)),
            "chat": Reference(chat_text, greedy(model, hf_tokenizer, chat_text, NUM_CHAT_TOKENS,
                                                add_special_tokens=False))}


def brute_force_cut(tokenizer, ids: list[int], stops: list[str]) -> int | None:
    """The number of tokens after which the decoded generated text first contains any stop, or None."""
    return next((n for n in range(1, len(ids) + 1) if any(s in tokenizer.decode(ids[:n]) for s in stops)), None)


def stream(client: httpx.Client, path: str, body: dict) -> list:
    """Every `data:` payload of a streaming POST, JSON-decoded, without OpenAI's `[DONE]`."""
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        payloads = [line[len("data:"):].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert all("error" not in p for p in payloads if p != "[DONE]"), payloads
    return [json.loads(p) for p in payloads if p != "[DONE]"]


def generate(client: httpx.Client, **parameters) -> dict:
    response = client.post("/generate", json={"inputs": PROMPT, "parameters": {"details": True, **parameters}})
    assert response.status_code == 200, response.text
    return response.json()


def stop_cases(tokenizer, ids: list[int]) -> dict[str, list[str]]:
    """Stops built from the reference continuation (token i's text is `piece(i)`)."""
    text = tokenizer.decode(ids)

    def piece(i: int) -> str:
        return tokenizer.decode(ids[i:i + 1])

    assert [piece(i) for i in (3, 4, 5)] == [" hand", "ed", " me"], "the reference changed: rebuild the cases"
    over_256 = text[1:281]  # starts with 😊, whose first bytes share token 0 with a space
    cases = {
        "spans_three_tokens": [tokenizer.decode(ids[3:6])],
        "starts_and_ends_mid_token": [tokenizer.decode(ids[3:6])[2:-1]],  # "anded m"
        "multi_byte_split_across_tokens": ["🥖."],
        "longer_than_256_characters": [over_256],
        "in_the_prompt_or_across_its_end_only": ["smiled", "smiled 😊"],
        "first_of_several": ["sumé", "Café", "🥖"],  # listed last, found first
    }
    assert len(over_256) > 256 and "smiled" not in text and 0 < text.index("🥖") < text.index("Café") < text.index("sumé")
    return cases


@pytest.mark.parametrize("case", ["spans_three_tokens", "starts_and_ends_mid_token", "multi_byte_split_across_tokens",
                                  "in_the_prompt_or_across_its_end_only", "first_of_several"])
def test_generate_stops_where_the_brute_force_cut_does(client, hf_tokenizer, references, case):
    """Oracle: `brute_force_cut` over transformers' greedy ids. TGI's output: the text up to and including
    the token that completes the first stop (the stop text is kept), finish_reason stop_sequence; a stop
    in the prompt (or straddling its end) never matches, only generated text counts. (The stop longer
    than 256 characters: `test_a_stop_longer_than_256_characters_ends_the_stream`.)"""
    ids = references["raw"].ids[:NUM_STOP_TOKENS]
    stops = stop_cases(hf_tokenizer, references["raw"].ids)[case]
    cut = brute_force_cut(hf_tokenizer, ids, stops)
    body = generate(client, max_new_tokens=NUM_STOP_TOKENS, stop=stops)
    details = body["details"]
    if case == "in_the_prompt_or_across_its_end_only":
        assert cut is None
        assert details["finish_reason"] == "length"
        assert body["generated_text"] == hf_tokenizer.decode(ids)
        return
    assert cut is not None and cut < NUM_STOP_TOKENS
    assert [t["id"] for t in details["tokens"]] == ids[:cut]
    assert body["generated_text"] == hf_tokenizer.decode(ids[:cut])
    assert any(stop in body["generated_text"] for stop in stops)
    assert details["finish_reason"] == "stop_sequence" and details["generated_tokens"] == cut


def test_a_stop_longer_than_256_characters_ends_the_stream(client, hf_tokenizer, references):
    """Oracle: `brute_force_cut` over transformers' greedy ids; the streamed token texts add up to the final
    text, which keeps the stop. (The engine once matched over a 256-character tail, so this never stopped.)"""
    ids = references["raw"].ids
    stops = stop_cases(hf_tokenizer, ids)["longer_than_256_characters"]
    cut = brute_force_cut(hf_tokenizer, ids, stops)
    assert cut is not None and cut < NUM_TOKENS
    events = stream(client, "/generate_stream",
                    {"inputs": PROMPT, "parameters": {"max_new_tokens": NUM_TOKENS, "stop": stops, "details": True}})
    assert [e["token"]["id"] for e in events] == ids[:cut]
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events) == hf_tokenizer.decode(ids[:cut])
    assert stops[0] in events[-1]["generated_text"]


def test_openai_routes_keep_the_stop_text_and_say_stop_sequence(client, hf_tokenizer, references):
    """Oracle: `brute_force_cut` over transformers' greedy ids (raw prompt for /v1/completions, the chat
    template for chat). As TGI (and the `stop` field's documentation): the stop text is kept and
    finish_reason is "stop_sequence", streamed or not. The chat stop "花园" is two CJK characters whose
    bytes the tokenizer splits across three tokens."""
    raw = references["raw"].ids
    stops = stop_cases(hf_tokenizer, raw)["starts_and_ends_mid_token"]
    cut = brute_force_cut(hf_tokenizer, raw, stops)
    request = {"prompt": PROMPT, "max_tokens": NUM_STOP_TOKENS, "temperature": 0, "stop": stops[0]}
    choice = client.post("/v1/completions", json=request).json()["choices"][0]
    assert choice["text"] == hf_tokenizer.decode(raw[:cut]) and choice["finish_reason"] == "stop_sequence"
    chunks = [c["choices"][0] for c in stream(client, "/v1/completions", {**request, "stream": True})]
    assert "".join(c["text"] for c in chunks) == choice["text"] and chunks[-1]["finish_reason"] == "stop_sequence"

    chat_ids = references["chat"].ids
    chat_cut = brute_force_cut(hf_tokenizer, chat_ids, ["花园"])
    assert chat_cut is not None and chat_cut < NUM_CHAT_TOKENS
    chat_request = {"messages": CHAT, "max_tokens": NUM_CHAT_TOKENS, "temperature": 0, "stop": ["花园"]}
    answer = client.post("/v1/chat/completions", json=chat_request).json()["choices"][0]
    assert answer["message"]["content"] == hf_tokenizer.decode(chat_ids[:chat_cut])
    assert answer["finish_reason"] == "stop_sequence"


def test_a_generation_cut_mid_character_ends_in_the_replacement_character_everywhere(client, hf_tokenizer, references):
    """Oracle: transformers' tokenizer decoding the reference ids cut after n tokens, for every n among the
    first NUM_UTF8_TOKENS where that leaves an incomplete UTF-8 character (decoded as U+FFFD). The
    /generate text, its details' token texts and the /generate_stream token texts all equal that decode."""
    ids = references["raw"].ids
    cuts = [n for n in range(1, NUM_UTF8_TOKENS + 1) if hf_tokenizer.decode(ids[:n]).endswith(REPLACEMENT)]
    assert len(cuts) >= 2, "the reference must split characters across tokens"
    for n in cuts:
        expected = hf_tokenizer.decode(ids[:n])
        body = generate(client, max_new_tokens=n)
        assert [t["id"] for t in body["details"]["tokens"]] == ids[:n]
        assert body["generated_text"] == "".join(t["text"] for t in body["details"]["tokens"]) == expected, n
        events = stream(client, "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": n}})
        assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events) == expected, n


def test_multi_byte_text_streams_whole_characters(client, hf_tokenizer, references):
    """Oracle: transformers' tokenizer decoding the reference ids. The streamed token texts add up to the
    final text and to that decode, one event per token, and no event carries part of a character (an
    incomplete one would show as U+FFFD): a token holding only the first bytes of a character sends ""."""
    ids = references["raw"].ids[:NUM_UTF8_TOKENS]
    expected = hf_tokenizer.decode(ids)
    assert REPLACEMENT not in expected and any(ord(c) > 0xFFFF for c in expected)
    events = stream(client, "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": len(ids)}})
    texts = [e["token"]["text"] for e in events]
    assert [e["token"]["id"] for e in events] == ids
    assert "".join(texts) == events[-1]["generated_text"] == expected
    assert not any(REPLACEMENT in text for text in texts), texts
    assert "" in texts, "the reference must have a token that ends inside a character"


@pytest.mark.parametrize("max_tokens", [1, NUM_CHAT_TOKENS])
def test_chat_stream_of_split_cjk_characters_equals_the_answer_and_the_decode(client, hf_tokenizer, references,
                                                                            max_tokens):
    """Oracle: transformers' tokenizer decoding transformers' greedy ids for the chat template with the
    assistant message continued. The first token holds only part of a CJK character: cut there (1 token),
    content and stream are U+FFFD; in full, the deltas are whole characters and add up to the answer."""
    expected = hf_tokenizer.decode(references["chat"].ids[:max_tokens])
    assert expected.endswith(REPLACEMENT) == (max_tokens == 1)
    request = {"messages": CHAT, "max_tokens": max_tokens, "temperature": 0}
    answer = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in
              stream(client, "/v1/chat/completions", {**request, "stream": True}) if c["choices"]]
    assert "".join(deltas) == answer == expected
    if max_tokens > 1:
        assert not any(REPLACEMENT in delta for delta in deltas), deltas
