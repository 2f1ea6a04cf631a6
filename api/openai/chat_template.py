"""Chat messages -> prompt text with the checkpoint's chat template, and TGI's template errors.

The template comes from the tokenizer (transformers reads `tokenizer_config.json`'s
`chat_template` and `chat_template.jinja`, which TGI does not: its issue #3247). Text content parts
are joined into one string, as TGI's `TextMessage` does. Tools (`tools.py`) reach a template that reads
`tools`, else they are described after the last message. A final assistant message is continued
(rendered without its end-of-turn), as TGI does. Rendering runs in a worker thread: a template is
arbitrary Jinja and a long conversation should not stall the event loop.
"""
from __future__ import annotations

import asyncio
import json

from tgserve.api.openai.schemas import ChatMessage, ImagePart
from tgserve.api.shared.errors import ApiError, validation_error
from tgserve.core.tokenizer import Tokenizer

TEMPLATE_NOT_FOUND = "template not found"  # TGI's message when the checkpoint has no chat template
# How to answer, told to a model whose template does not read `tools`; the answer's shape is the grammar's
DEFAULT_TOOL_PROMPT = ('To call one of the functions above, answer with only a JSON object: {"name": <the '
                       'function\'s name>, "arguments": <an object of its arguments>}.')


def template_error(message: str) -> ApiError:
    """422 "template_error", with TGI's "Template error: " prefix."""
    return ApiError(422, "template_error", f"Template error: {message}")


def message_text(message: ChatMessage, position: int) -> str:
    """The message's content as one string; image parts are refused (text-only models)."""
    content = message.content
    if content is None:  # an assistant message that only calls tools
        return ""
    if isinstance(content, str):
        return content
    if any(isinstance(part, ImagePart) for part in content):
        raise validation_error(f"messages[{position}]: image content parts are not supported: "
                               "tgserve serves text-only models")
    return "".join(part.text for part in content)  # type: ignore[union-attr]


def template_message(message: ChatMessage, position: int, is_tool_template: bool) -> dict:
    """One message as the template sees it: `{role, content}` with content flattened to text, plus the
    calls of an assistant message that called tools and the call id a tool's result answers. A template
    that knows no tools reads earlier calls as their JSON answer (`tools.ToolPlan`'s form) in `content`."""
    rendered = {"role": message.role, "content": message_text(message, position)}
    if message.tool_calls:
        rendered["tool_calls"] = message.tool_calls
        if not is_tool_template and not rendered["content"]:
            rendered["content"] = json.dumps([_answer_form(call) for call in message.tool_calls], ensure_ascii=False)
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        rendered["name"] = message.name
    return rendered


def _answer_form(call: object) -> object:
    """An OpenAI tool call {"function": {"name", "arguments": <JSON text>}} as {"name", "arguments"}."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return call
    arguments = function.get("arguments")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        pass
    return {"name": function.get("name"), "arguments": arguments}


def render_sync(tokenizer: Tokenizer, messages: list[ChatMessage], tools: list[dict] | None = None,
                tool_prompt: str | None = None) -> str:
    """Render `messages` to prompt text; raises `ApiError` 422 (template or validation error).

    tools: the functions the answer may call. A template that reads `tools` gets them; for one that
    does not, they are described after the last message (TGI appends them the same way), with
    `tool_prompt` (or DEFAULT_TOOL_PROMPT) saying how to answer."""
    if tokenizer.chat_template is None:
        raise template_error(TEMPLATE_NOT_FOUND)
    is_tool_template = tokenizer.is_tool_template
    rendered = [template_message(m, i, is_tool_template) for i, m in enumerate(messages)]
    if tools and not is_tool_template:
        description = json.dumps(tools, ensure_ascii=False)
        rendered[-1]["content"] += f"\n---\n{description}\n{tool_prompt or DEFAULT_TOOL_PROMPT}"
    is_continuation = messages[-1].role == "assistant"
    try:
        return tokenizer.apply_chat_template(rendered, add_generation_prompt=not is_continuation,
                                             continue_final_message=is_continuation,
                                             tools=tools if tools and is_tool_template else None)
    except Exception as error:  # Jinja errors, raise_exception() in the template, a bad continuation
        raise template_error(str(error)) from None


async def render_chat(tokenizer: Tokenizer, messages: list[ChatMessage], tools: list[dict] | None = None,
                      tool_prompt: str | None = None) -> str:
    """`render_sync` in a worker thread."""
    return await asyncio.to_thread(render_sync, tokenizer, messages, tools, tool_prompt)
