"""Chat messages -> prompt text with the checkpoint's chat template, and TGI's template errors.

The template comes from the tokenizer (transformers reads `tokenizer_config.json`'s
`chat_template` and `chat_template.jinja`, which TGI does not: its issue #3247). Text content parts
are joined into one string, as TGI's `TextMessage` does. A final assistant message is continued
(rendered without its end-of-turn), as TGI does. Rendering runs in a worker thread: a template is
arbitrary Jinja and a long conversation should not stall the event loop.
"""
from __future__ import annotations

import asyncio

from tgserve.api.openai.schemas import ChatMessage, ImagePart
from tgserve.api.shared.errors import ApiError, validation_error
from tgserve.core.tokenizer import Tokenizer

TEMPLATE_NOT_FOUND = "template not found"  # TGI's message when the checkpoint has no chat template


def template_error(message: str) -> ApiError:
    """422 "template_error", with TGI's "Template error: " prefix."""
    return ApiError(422, "template_error", f"Template error: {message}")


def message_text(message: ChatMessage, position: int) -> str:
    """The message's content as one string; image parts are refused (text-only models)."""
    if message.tool_calls:
        raise validation_error("`tool_calls` in messages are not supported by tgserve yet")
    content = message.content
    if content is None:  # only beside an empty `tool_calls` list (ChatMessage requires one of them)
        return ""
    if isinstance(content, str):
        return content
    if any(isinstance(part, ImagePart) for part in content):
        raise validation_error(f"messages[{position}]: image content parts are not supported: "
                               "tgserve serves text-only models")
    return "".join(part.text for part in content)  # type: ignore[union-attr]


def template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The `messages` variable the template sees: `{role, content}` with content flattened to text."""
    return [{"role": m.role, "content": message_text(m, i)} for i, m in enumerate(messages)]


def render_sync(tokenizer: Tokenizer, messages: list[ChatMessage]) -> str:
    """Render `messages` to prompt text; raises `ApiError` 422 (template or validation error)."""
    if tokenizer.chat_template is None:
        raise template_error(TEMPLATE_NOT_FOUND)
    rendered = template_messages(messages)
    is_continuation = messages[-1].role == "assistant"
    try:
        return tokenizer.apply_chat_template(rendered, add_generation_prompt=not is_continuation,
                                             continue_final_message=is_continuation)
    except Exception as error:  # Jinja errors, raise_exception() in the template, a bad continuation
        raise template_error(str(error)) from None


async def render_chat(tokenizer: Tokenizer, messages: list[ChatMessage]) -> str:
    """`render_sync` in a worker thread."""
    return await asyncio.to_thread(render_sync, tokenizer, messages)
