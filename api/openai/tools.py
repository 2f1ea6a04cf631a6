"""OpenAI `tools` / `tool_choice` -> a grammar the answer follows, and the answer back -> `tool_calls`.

The model answers a tool call as one JSON object, `{"name": <function>, "arguments": {...}}` (the
shape Hermes- and Qwen-style templates teach), constrained by a JSON-schema grammar: an `anyOf` with
one branch per callable function whose `name` is a `const` and whose `arguments` is that function's
`parameters` schema, so the name is always declared and the arguments always validate. `tool_choice`:
  "none" (or no tools): no grammar, tools are not shown to the model;
  "auto" (the default with tools): one more branch, `no_tool`, whose `arguments` is `{"content":
    <text>}`: choosing it answers in plain text (the message's `content`), in the same generation;
  "required": one of the functions; a function's name (OpenAI's `{"type": "function", "function":
    {"name": ...}}`, or TGI's bare string): exactly that one.
A grammar (`response_format`) and tools together are refused, as TGI refuses them.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from tgserve.api.shared.errors import ApiError
from tgserve.api.shared.schemas import GrammarType

NO_TOOL = "no_tool"  # the `auto` branch that answers in text
ANY_OBJECT = {"type": "object"}  # the arguments of a function that declares no `parameters`


def tool_error(message: str) -> ApiError:
    """TGI's 422 `tool_error`, with its "Tool error: " prefix."""
    return ApiError(422, "tool_error", f"Tool error: {message}")


@dataclass(slots=True, frozen=True)
class ToolPlan:
    """The tools a request's answer may call, once checked."""

    tools: tuple[dict, ...]  # every declared tool, as sent ({"type": "function", "function": {...}})
    callable_names: tuple[str, ...]  # the functions the answer may call (one for a named tool_choice)
    is_text_allowed: bool  # tool_choice "auto": the answer may be text (`no_tool`)

    def grammar(self) -> GrammarType:
        """The JSON-schema grammar every answer follows."""
        functions = {t["function"]["name"]: t["function"] for t in self.tools}
        branches = [_call_schema(name, functions[name].get("parameters") or ANY_OBJECT)
                    for name in self.callable_names]
        if self.is_text_allowed:
            branches.append(_call_schema(NO_TOOL, {"type": "object", "properties": {"content": {"type": "string"}},
                                                   "required": ["content"], "additionalProperties": False}))
        return GrammarType(type="json", value=branches[0] if len(branches) == 1 else {"anyOf": branches})

    def template_tools(self) -> list[dict]:
        """The tools the chat template (or the prompt) shows the model: the callable ones."""
        return [t for t in self.tools if t["function"]["name"] in self.callable_names]


def _call_schema(name: str, parameters: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def plan_tools(tools: list | None, tool_choice: object, has_grammar: bool) -> ToolPlan | None:
    """The request's `ToolPlan`, or None when its answer is plain text; raises `ApiError` 422
    (validation for malformed tools, tool_error for a choice that names no declared tool)."""
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise tool_error('`tool_choice` must be "none", "auto", "required", a function name, or '
                             '{"type": "function", "function": {"name": ...}}')
        choice = function["name"]
    if not isinstance(choice, str):
        raise tool_error(f"`tool_choice` must be a string or an object, got {type(choice).__name__}")
    if not tools or choice == "none":
        if choice not in ("none", "auto"):
            raise tool_error(f"`tool_choice` {choice!r} needs `tools`")
        return None
    names = [_function_name(tool, index) for index, tool in enumerate(tools)]
    if len(set(names)) != len(names):
        raise tool_error("two tools have the same function name")
    if NO_TOOL in names:
        raise tool_error(f"'{NO_TOOL}' is reserved (the text answer of tool_choice \"auto\")")
    if has_grammar:
        raise tool_error("Grammar and tools are mutually exclusive")
    if choice in ("auto", "required"):
        return ToolPlan(tuple(tools), tuple(names), is_text_allowed=choice == "auto")
    if choice not in names:
        raise tool_error(f"Tool with name {choice} not found")
    return ToolPlan(tuple(tools), (choice,), is_text_allowed=False)


def _function_name(tool: object, index: int) -> str:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise tool_error(f'tools[{index}] must be {{"type": "function", "function": {{"name": ..., "parameters": '
                         f'<JSON schema>}}}}')
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise tool_error(f"tools[{index}]: `parameters` must be a JSON schema object")
    return function["name"]


@dataclass(slots=True, frozen=True)
class ToolAnswer:
    """What the model answered under a `ToolPlan`: a call, or text (`no_tool`, or output that is not a
    whole call because the generation stopped early)."""

    name: str | None  # the called function; None: a text answer
    arguments: str  # the call's arguments as JSON text ("" for text)
    content: str | None  # the text answer; None for a call

    def message(self, call_id: str) -> dict:
        """The assistant message of a chat completion."""
        if self.name is None:
            return {"role": "assistant", "content": self.content}
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}]}


def read_answer(text: str) -> ToolAnswer:
    """The answer in `text`, the whole generated output."""
    try:
        call = json.loads(text)
        name, arguments = call["name"], call["arguments"]
    except (ValueError, TypeError, KeyError):
        return ToolAnswer(None, "", text)  # cut short (max_tokens, a stop sequence): what was generated
    if name == NO_TOOL:
        return ToolAnswer(None, "", str(arguments.get("content", "")))
    return ToolAnswer(name, json.dumps(arguments, ensure_ascii=False), None)


def new_call_id() -> str:
    """An id for one tool call, in OpenAI's form ("call_" + 24 hex digits)."""
    return f"call_{secrets.token_hex(12)}"
