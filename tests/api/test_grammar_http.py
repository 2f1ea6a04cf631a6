"""Structured output through HTTP on a real server: TGI's `grammar` on /generate, /generate_stream and `/`,
OpenAI's `response_format` on chat and completions, and `tools` (whole and streamed), with the official
`text_generation` and `openai` clients; bad grammars are 422s that leave requests in flight alone, and
`--disable-grammar-support` answers TGI's refusal.

Oracles: `json.loads` + `jsonschema` for JSON outputs, `re.fullmatch` for regexes, the declared tools'
parameter schemas for tool-call arguments. Schemas bound every string, so the demo model's outputs end
well inside max_new_tokens.
"""
from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import openai
import pytest
import text_generation  # installed --no-deps by scripts/test.sh, from tests/no-deps-requirements.txt
from text_generation.types import Grammar, GrammarType

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pet": {"enum": ["cat", "dog", "fish"]}}}
ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 3}
SENTENCE = r"[a-z]{1,8} (is|was) [0-9]{1,3}"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "unit"],
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}
NEW_TOKENS = 80
COMPILE_TIMEOUT_S = 0.25  # this module's --grammar-compile-timeout: every grammar above compiles in ~1 ms
# Valid but slow to compile: 1,500 alternatives of 10 required properties, ~1 s on a Zen 5 core
# (llguidance refuses 2,000 of them as too large).
SLOW_SCHEMA = {"anyOf": [{"type": "object", "properties": {f"p{i}_{j}": {"type": "integer"} for j in range(10)},
                          "required": [f"p{i}_{j}" for j in range(10)]} for i in range(1500)]}
# Compiles, but llguidance's lexer gives up on the string's first character: a dead end at run time.
DEAD_END = {"type": "object", "required": ["a"], "properties": {"a": {"type": "string", "pattern": "^x{1000000}$"}}}
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # text_generation calls pydantic's .dict()


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--grammar-compile-timeout", str(COMPILE_TIMEOUT_S))


def generate(url: str, grammar: dict, route: str = "/generate", **parameters) -> httpx.Response:
    return httpx.post(f"{url}{route}", json={"inputs": "Tell me about Anna.", "parameters": {
        "max_new_tokens": NEW_TOKENS, "grammar": grammar, "return_full_text": False, **parameters}}, timeout=120)


def valid(text: str, schema: dict) -> object:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def test_tgi_grammar_on_every_generate_route(server):
    for route in ("/generate", "/"):
        response = generate(server.url, {"type": "json", "value": PERSON}, route)
        assert response.status_code == 200, response.text
        body = response.json()
        valid((body[0] if isinstance(body, list) else body)["generated_text"], PERSON)
    sampled = generate(server.url, {"type": "json_schema", "value": {"name": "list", "schema": ARRAY}},
                       do_sample=True, seed=7, details=True)
    assert sampled.status_code == 200 and sampled.json()["details"]["finish_reason"] == "eos_token"
    valid(sampled.json()["generated_text"], ARRAY)  # a top-level array: TGI refuses it
    regex = generate(server.url, {"type": "regex", "value": SENTENCE})
    assert re.fullmatch(SENTENCE, regex.json()["generated_text"]), regex.text
    with httpx.stream("POST", f"{server.url}/generate_stream", json={"inputs": "Anna", "parameters": {
            "max_new_tokens": NEW_TOKENS, "grammar": {"type": "json", "value": PERSON}}}, timeout=120) as stream:
        events = [json.loads(line[len("data:"):]) for line in stream.iter_lines() if line.startswith("data:")]
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == events[-1]["generated_text"]
    valid(events[-1]["generated_text"], PERSON)


def test_text_generation_clients_grammar(server):
    client = text_generation.Client(server.url, timeout=120)
    answer = client.generate("Anna", max_new_tokens=NEW_TOKENS, grammar=Grammar(type=GrammarType.Json, value=PERSON))
    valid(answer.generated_text, PERSON)
    regex = client.generate("Anna", max_new_tokens=NEW_TOKENS, grammar=Grammar(type=GrammarType.Regex, value=SENTENCE))
    assert re.fullmatch(SENTENCE, regex.generated_text)


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0) as client:
        yield client


def test_openai_response_formats(oai):
    messages = [{"role": "user", "content": "Describe a person."}]
    chat = oai.chat.completions.create(model="tgi", messages=messages, max_tokens=NEW_TOKENS, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    valid(chat.choices[0].message.content, PERSON)
    assert chat.choices[0].finish_reason == "stop"
    any_object = oai.chat.completions.create(model="tgi", messages=messages, max_tokens=NEW_TOKENS, temperature=0,
                                             response_format={"type": "json_object"})
    content = any_object.choices[0].message.content  # unbounded: the demo model may write one long key
    assert isinstance(json.loads(content), dict) if any_object.choices[0].finish_reason == "stop" else \
        content.startswith("{")
    completion = oai.completions.create(model="tgi", prompt="A person:", max_tokens=NEW_TOKENS, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}})
    valid(completion.choices[0].text, PERSON)


@pytest.mark.parametrize("tool_choice", ["required", "get_time", {"type": "function", "function": {"name": "get_weather"}}])
def test_openai_tool_calls(oai, tool_choice):
    choice = tool_choice if not isinstance(tool_choice, str) or tool_choice == "required" else {
        "type": "function", "function": {"name": tool_choice}}
    completion = oai.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER, TIME], tool_choice=choice, max_tokens=NEW_TOKENS)
    choice_out = completion.choices[0]
    assert choice_out.finish_reason == "tool_calls" and choice_out.message.content is None
    [call] = choice_out.message.tool_calls
    declared = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    if tool_choice != "required":
        assert call.function.name == (tool_choice if isinstance(tool_choice, str) else "get_weather")
    valid(call.function.arguments, declared[call.function.name])
    assert call.id.startswith("call_") and call.type == "function"


def test_openai_tool_calls_stream_as_deltas(oai):
    stream = oai.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER],
        tool_choice="required", max_tokens=NEW_TOKENS, stream=True)
    chunks = list(stream)
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert all(c.index == 0 and c.function.name is None for c in calls[1:])
    valid("".join(c.function.arguments for c in calls), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_tools_answer_in_text_or_a_call_and_none_ignores_them(oai):
    messages = [{"role": "user", "content": "Hello"}]
    auto = oai.chat.completions.create(model="tgi", messages=messages, tools=[WEATHER], max_tokens=NEW_TOKENS)
    message = auto.choices[0].message
    if message.tool_calls:  # a call, or a text answer: both are answers `auto` allows
        valid(message.tool_calls[0].function.arguments, WEATHER["function"]["parameters"])
    else:
        assert isinstance(message.content, str) and auto.choices[0].finish_reason in ("stop", "length")
    none = oai.chat.completions.create(model="tgi", messages=messages, tools=[WEATHER], tool_choice="none",
                                       max_tokens=5)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


@pytest.mark.parametrize("grammar, messages", [
    ({"type": "json", "value": {"type": "object", "properties": {"a": {"type": "strin"}}}}, ["invalid JSON schema"]),
    ({"type": "regex", "value": "(unclosed"}, ["invalid regex"]),
    ({"type": "json", "value": {"type": "string", "pattern": "(?<=a)b"}}, ["invalid JSON schema"]),
    ({"type": "json", "value": SLOW_SCHEMA}, [f"compiling the JSON schema took longer than {COMPILE_TIMEOUT_S:g} s"]),
    # Refused by the first-step check after ~0.4 s on Zen 5, or by the time limit on a slower machine.
    ({"type": "regex", "value": "x{1000000}"}, ["regex too complex for the grammar engine", "compiling the regex took longer"]),
])
def test_bad_grammars_are_422s_beside_a_request_in_flight(server, grammar, messages):
    in_flight: dict = {}
    worker = threading.Thread(target=lambda: in_flight.update(
        response=generate(server.url, {"type": "json", "value": PERSON})))
    worker.start()
    response = generate(server.url, grammar)
    worker.join(timeout=120)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error_type"] == "validation" and body["error"].startswith("Input validation error: ")
    assert any(message in body["error"] for message in messages), body
    assert in_flight["response"].status_code == 200
    valid(in_flight["response"].json()["generated_text"], PERSON)


def test_a_grammar_dead_end_fails_its_request_with_the_reason_and_the_server_goes_on(server):
    in_flight: dict = {}
    worker = threading.Thread(target=lambda: in_flight.update(
        response=generate(server.url, {"type": "json", "value": PERSON}, seed=3, do_sample=True)))
    worker.start()
    dead = generate(server.url, {"type": "json", "value": DEAD_END})
    with httpx.stream("POST", f"{server.url}/generate_stream", json={"inputs": "Anna", "parameters": {
            "max_new_tokens": NEW_TOKENS, "grammar": {"type": "json", "value": DEAD_END}}}, timeout=120) as stream:
        events = [json.loads(line[len("data:"):]) for line in stream.iter_lines() if line.startswith("data:")]
    worker.join(timeout=120)
    assert dead.status_code == 424, dead.text
    assert dead.json()["error_type"] == "generation"
    assert "the grammar allowed no next token" in dead.json()["error"] and "too many expressions" in dead.json()["error"]
    assert "the grammar allowed no next token" in events[-1]["error"] and "generated_text" not in events[-1]
    assert all(not e.get("token", {}).get("text", "").startswith("x") for e in events)  # the refused token never shows
    assert in_flight["response"].status_code == 200
    valid(in_flight["response"].json()["generated_text"], PERSON)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_best_of_candidates_all_follow_the_grammar(server):
    response = generate(server.url, {"type": "json", "value": PERSON}, best_of=2, do_sample=True,
                        temperature=1.5, details=True)
    assert response.status_code == 200, response.text
    body = response.json()
    valid(body["generated_text"], PERSON)
    others = body["details"]["best_of_sequences"]
    assert len(others) == 1
    for other in others:
        valid(other["generated_text"], PERSON)


def test_disable_grammar_support_refuses_as_tgi(start_server):
    server = start_server("--disable-grammar-support", "--prometheus-port", "0")
    response = generate(server.url, {"type": "regex", "value": "a+"})
    assert response.status_code == 422
    assert response.json() == {"error": "Input validation error: grammar is not supported", "error_type": "validation"}
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER], "max_tokens": 5}, timeout=60)
    assert chat.status_code == 422 and "grammar is not supported" in chat.json()["error"]
