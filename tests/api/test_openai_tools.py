"""OpenAI tools: `tool_choice` -> the answer's grammar, the answer -> `tool_calls`, and the streamed
answer -> tool-call deltas that add up to the non-streamed call (`tools.py`, `tool_stream.py`)."""
from __future__ import annotations

import json

import jsonschema
import pytest

from tgserve.api.openai.tool_stream import ToolStream
from tgserve.api.openai.tools import NO_TOOL, plan_tools, read_answer
from tgserve.api.shared.errors import ApiError

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters: any object


def schema_of(plan) -> dict:
    grammar = plan.grammar()
    assert grammar.type == "json"
    return grammar.value


@pytest.mark.parametrize("choice, names, is_text", [
    (None, ["get_weather", "get_time", NO_TOOL], True), ("auto", ["get_weather", "get_time", NO_TOOL], True),
    ("required", ["get_weather", "get_time"], False), ("get_time", ["get_time"], False),
    ({"type": "function", "function": {"name": "get_weather"}}, ["get_weather"], False)])
def test_tool_choice_decides_what_the_answer_may_be(choice, names, is_text):
    plan = plan_tools([WEATHER, TIME], choice, has_grammar=False)
    schema = schema_of(plan)
    branches = schema.get("anyOf", [schema])
    assert [b["properties"]["name"]["const"] for b in branches] == names and plan.is_text_allowed == is_text
    for answer, is_valid in (({"name": "get_weather", "arguments": {"city": "Paris"}}, "get_weather" in names),
                             ({"name": "get_weather", "arguments": {}}, False),  # city is required
                             ({"name": "get_time", "arguments": {"tz": "UTC"}}, "get_time" in names),
                             ({"name": NO_TOOL, "arguments": {"content": "Hi"}}, is_text),
                             ({"name": "other", "arguments": {}}, False)):
        assert jsonschema.Draft202012Validator(schema).is_valid(answer) == is_valid, answer
    assert [t["function"]["name"] for t in plan.template_tools()] == [n for n in names if n != NO_TOOL]


def test_no_tools_or_none_is_a_text_answer():
    assert plan_tools(None, None, has_grammar=False) is None
    assert plan_tools([WEATHER], "none", has_grammar=True) is None


@pytest.mark.parametrize("tools, choice, has_grammar, message", [
    ([WEATHER], "get_time", False, "Tool with name get_time not found"),
    ([WEATHER], None, True, "Grammar and tools are mutually exclusive"),
    ([{"type": "function", "function": {"name": NO_TOOL}}], None, False, "is reserved"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, False, "must be a JSON schema"),
    ([{"type": "retrieval"}], None, False, "tools[0] must be"),
    (None, "get_time", False, "needs `tools`"),
    ([WEATHER], {"type": "function"}, False, "`tool_choice` must be"),
])
def test_bad_tools_are_tool_errors(tools, choice, has_grammar, message):
    with pytest.raises(ApiError) as refused:
        plan_tools(tools, choice, has_grammar)
    assert (refused.value.status_code, refused.value.error_type) == (422, "tool_error")
    assert refused.value.message.startswith("Tool error: ") and message in refused.value.message


def test_answers_read_back_as_calls_or_text():
    call = read_answer('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert (call.name, json.loads(call.arguments), call.content) == ("get_weather", {"city": "Paris"}, None)
    message = call.message("call_1")
    assert message["content"] is None and message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]
    text = read_answer('{"name": "no_tool", "arguments": {"content": "Hello!"}}')
    assert (text.name, text.content) == (None, "Hello!") and text.message("x") == {"role": "assistant",
                                                                                    "content": "Hello!"}
    cut = read_answer('{"name": "get_weather", "argu')  # max_tokens ran out: the text as generated
    assert (cut.name, cut.content) == (None, '{"name": "get_weather", "argu')


def stream(text: str, piece_size: int) -> tuple[ToolStream, list[dict]]:
    tool_stream, deltas = ToolStream("call_9"), []
    for start in range(0, len(text), piece_size):
        deltas += tool_stream.feed(text[start:start + piece_size])
    return tool_stream, deltas + tool_stream.finish()


@pytest.mark.parametrize("piece_size", [1, 2, 7, 1000])
def test_streamed_calls_add_up_to_the_call(piece_size):
    answer = '{ "name" : "get_weather", "arguments": {"city": "Paris}", "when": {"day": 1} } }\n'
    tool_stream, deltas = stream(answer, piece_size)
    first, *rest = deltas
    assert first == {"role": "assistant", "tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                                          "function": {"name": "get_weather", "arguments": ""}}]}
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d in rest]
    assert all(fragments) and all(d["tool_calls"][0] == {"index": 0, "function": {"arguments": f}}
                                  for d, f in zip(rest, fragments))
    assert json.loads("".join(fragments)) == {"city": "Paris}", "when": {"day": 1}} and tool_stream.is_call


@pytest.mark.parametrize("piece_size", [1, 3, 1000])
def test_streamed_text_answers_decode_their_content(piece_size):
    content = 'Say "hi" \\ été 😀\n'
    tool_stream, deltas = stream(json.dumps({"name": NO_TOOL, "arguments": {"content": content}}), piece_size)
    assert "".join(d["content"] for d in deltas) == content and not tool_stream.is_call
    assert all(set(d) == {"role", "content"} for d in deltas)


def test_a_stream_cut_before_the_name_ends_as_text():
    tool_stream, deltas = stream('{"name": "get_we', 4)
    assert deltas == [{"role": "assistant", "content": '{"name": "get_we'}] and not tool_stream.is_call
