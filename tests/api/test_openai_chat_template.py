"""Chat messages -> prompt text (`tgserve.api.openai.chat_template`) on the demo tokenizer, and TGI's
"Template error: template not found" for a checkpoint without a chat template, from a real server."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from tgserve.api.openai.chat_template import DEFAULT_TOOL_PROMPT, render_sync, template_message
from tgserve.api.openai.schemas import ChatMessage
from tgserve.api.shared.errors import ApiError
from tgserve.core.tokenizer import Tokenizer
from .conftest import TEST_SERVER_FLAGS, server_factory

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def messages(*pairs: tuple[str, object]) -> list[ChatMessage]:
    return [ChatMessage.model_validate({"role": role, "content": content}) for role, content in pairs]


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir)


def tokenizer_copy(model_dir: Path, directory: Path, chat_template: str | None) -> Tokenizer:
    """The demo tokenizer from a checkpoint copy whose only chat template is `chat_template`."""
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(model_dir / name, directory / name)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # and no chat_template.jinja is copied
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer(directory)


@pytest.fixture(scope="module")
def templateless_tokenizer(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return tokenizer_copy(model_dir, tmp_path_factory.mktemp("no-template"), None)


def test_renders_with_a_generation_prompt(tokenizer):
    text = render_sync(tokenizer, messages(("user", "Hi")))
    assert text == SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with_system = render_sync(tokenizer, messages(("system", "Be brief."), ("user", "Hi")))
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_text_parts_are_joined_and_no_content_is_empty():
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "this?"}]
    no_content = ChatMessage.model_validate({"role": "assistant", "tool_calls": []})
    assert [template_message(m, i, False) for i, m in enumerate([*messages(("user", parts)), no_content])] == [
        {"role": "user", "content": "What is this?"}, {"role": "assistant", "content": ""}]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_tools_are_described_after_the_last_message_for_a_template_without_them(tokenizer):
    assert not tokenizer.is_tool_template
    text = render_sync(tokenizer, messages(("user", "Weather in Paris?")), [WEATHER])
    assert (f"Weather in Paris?\n---\n{json.dumps([WEATHER])}\n{DEFAULT_TOOL_PROMPT}<|im_end|>\n"
            "<|im_start|>assistant\n") in text
    custom = render_sync(tokenizer, messages(("user", "Hi")), [WEATHER], tool_prompt="Call one.")
    assert custom.endswith("\nCall one.<|im_end|>\n<|im_start|>assistant\n")


def test_a_template_that_reads_tools_gets_them_and_earlier_calls(model_dir, tmp_path):
    template = ("{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}{% for m in messages %}"
                "<{{ m.role }}>{{ m.content }}{% for c in m.tool_calls or [] %}(call {{ c.function.name }} "
                "{{ c.function.arguments }}){% endfor %}{% if m.tool_call_id %}(for {{ m.tool_call_id }}){% endif %}"
                "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    with_tools = tokenizer_copy(model_dir, tmp_path, template)
    assert with_tools.is_tool_template
    history = [ChatMessage.model_validate(m) for m in (
        {"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}, {"role": "user", "content": "And now?"})]
    assert render_sync(with_tools, history, [WEATHER]) == (
        '[tool get_weather]<user>Weather?<assistant>(call get_weather {"city": "Paris"})<tool>sunny(for call_1)'
        "<user>And now?<assistant>")


def test_earlier_calls_read_as_answers_for_a_template_without_tools(tokenizer):
    call = ChatMessage.model_validate({"role": "assistant", "tool_calls": [CALL]})
    assert template_message(call, 1, False)["content"] == '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    assert template_message(call, 1, True)["content"] == ""  # the template renders the calls itself


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None},
                                     {"role": "assistant", "content": None, "tool_calls": None}])
def test_a_message_needs_content_or_tool_calls(message):
    with pytest.raises(ValidationError, match="a message needs `content` or `tool_calls`"):
        ChatMessage.model_validate(message)


def test_a_final_assistant_message_is_continued(tokenizer):
    text = render_sync(tokenizer, messages(("user", "Hi"), ("assistant", "Hello the")))
    assert text.endswith("<|im_start|>assistant\nHello the")


@pytest.mark.parametrize("content", [
    [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
    [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}],
])
def test_images_are_refused(tokenizer, content):
    with pytest.raises(ApiError) as refused:
        render_sync(tokenizer, messages(("user", content)))
    assert (refused.value.status_code, refused.value.error_type) == (422, "validation")
    assert "image content parts are not supported" in refused.value.message


def test_template_errors(model_dir, tmp_path, templateless_tokenizer):
    assert templateless_tokenizer.chat_template is None
    with pytest.raises(ApiError) as missing:
        render_sync(templateless_tokenizer, messages(("user", "Hi")))
    assert missing.value.body() == {"error": "Template error: template not found", "error_type": "template_error"}
    raising = tokenizer_copy(model_dir, tmp_path, "{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(ApiError) as failed:
        render_sync(raising, messages(("user", "Hi")))
    assert failed.value.error_type == "template_error"
    assert failed.value.message.startswith("Template error: ") and "roles must alternate" in failed.value.message


def test_a_checkpoint_without_template_gets_tgi_422(model_dir, tmp_path_factory):
    """A real server on a copy of the demo checkpoint without a chat template answers TGI's 422."""
    checkpoint = tmp_path_factory.mktemp("no-template-checkpoint")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(model_dir / name, checkpoint / name)
    tokenizer_copy(model_dir, checkpoint, None)
    expected = {"error": "Template error: template not found", "error_type": "template_error"}
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    with server_factory(tmp_path_factory, *TEST_SERVER_FLAGS) as start:
        server = start(checkpoint)
        for path, extra in (("/v1/chat/completions", {}), ("/v1/chat/completions", {"stream": True}),
                            ("/chat_tokenize", {})):
            response = httpx.post(f"{server.url}{path}", json={**body, **extra}, timeout=60)
            assert (response.status_code, response.json()) == (422, expected), path
        plain = httpx.post(f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                           timeout=60)
        assert plain.status_code == 200  # only the chat routes need a template
