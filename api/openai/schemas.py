"""Request bodies of the OpenAI-compatible routes, mirroring TGI's `ChatRequest` and `CompletionRequest`.

Parsed as strictly as the native routes (`tgserve.api.shared.schemas`): wrong JSON types are a 422, unknown
fields are ignored (serde's default, and what OpenAI clients rely on when they send `user` or
`store`). Fields TGI accepts but tgserve cannot honour yet (`n` > 1, `logit_bias`, ...) are parsed
here and refused in `tgserve.api.openai.params`, never silently dropped.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tgserve.api.shared.schemas import MAX_U32, MAX_U64, ErrorResponse

_REQUEST_CONFIG = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)  # as the native routes


class TextPart(BaseModel):
    """A `{"type": "text", "text": ...}` content part."""

    model_config = _REQUEST_CONFIG
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    """Where an image part points: an http(s) URL or a `data:` URI."""

    model_config = _REQUEST_CONFIG
    url: str


class ImagePart(BaseModel):
    """A `{"type": "image_url", ...}` content part (refused: tgserve serves text-only models)."""

    model_config = _REQUEST_CONFIG
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One message of the conversation; `content` is a string or a list of content parts.

    A message carries `content` or `tool_calls` (TGI's untagged `MessageBody`): one with neither,
    or with a null `content` and no `tool_calls`, is a 422, as in TGI and OpenAI.
    """

    model_config = _REQUEST_CONFIG
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = Field(None, description="The calls an assistant message made")
    tool_call_id: str | None = Field(None, description="The call a `tool` message answers")

    @model_validator(mode="after")
    def _has_a_body(self) -> "ChatMessage":
        if self.content is None and self.tool_calls is None:
            raise ValueError("a message needs `content` or `tool_calls`")
        return self


class StreamOptions(BaseModel):
    """`stream_options`: with `include_usage` an extra chunk carries the token counts."""

    model_config = _REQUEST_CONFIG
    include_usage: bool | None = None


class SamplingFields(BaseModel):
    """The OpenAI sampling fields both routes share; null means the OpenAI default."""

    model_config = _REQUEST_CONFIG
    model: str | None = Field(None, description="Any string; echoed back in the response")
    max_tokens: int | None = Field(None, ge=0, le=MAX_U32, description="Tokens to generate at most")
    temperature: float | None = Field(None, description="0 means greedy; anything else samples")
    top_p: float | None = Field(None, description="Nucleus sampling, in (0, 1]")
    frequency_penalty: float | None = Field(None, description="In [-2, 2]")
    presence_penalty: float | None = Field(None, description="In [-2, 2] (non-zero refused for now)")
    stop: str | list[str] | None = Field(None, description="Stop at any of these (the stop text is kept)")
    seed: int | None = Field(None, ge=0, le=MAX_U64, description="Random sampling seed")
    n: int | None = Field(None, description="Only 1 is supported")
    logit_bias: Any = Field(None, description="Refused when set: not supported yet")
    stream: bool | None = Field(None, description="Answer with server-sent events")
    stream_options: StreamOptions | None = None
    response_format: Any = Field(None, description="text, json_object, json_schema (OpenAI's), or TGI's grammar "
                                                   "({'type': 'json' | 'regex', 'value': ...})")


class ChatRequest(SamplingFields):
    """Body of POST /v1/chat/completions and POST /chat_tokenize."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, le=MAX_U32, description="Alias of max_tokens")
    logprobs: bool | None = Field(None, description="Return the logprob of each generated token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_U32, description="Alternatives per token")
    tools: list[Any] | None = Field(None, description="Functions the answer may call")
    tool_choice: Any = Field(None, description="'auto' (default with tools), 'none', 'required', or a function")
    tool_prompt: str | None = Field(None, description="How to call tools, for a template that does not read them")


class CompletionRequest(SamplingFields):
    """Body of POST /v1/completions: one prompt or a list of up to --max-client-batch-size."""

    prompt: str | list[str] = Field(description="Each prompt is its own request")
    suffix: str | None = Field(None, description="Refused, as TGI does")
    echo: bool | None = Field(None, description="Prepend the prompt to the completion")
    logprobs: int | None = Field(None, ge=0, le=MAX_U32, description="Alternatives per token, with logprobs")
    best_of: int | None = Field(None, description="Only 1 is supported")
    repetition_penalty: float | None = Field(None, description="TGI's repetition penalty, > 0")


# The error statuses the OpenAI routes document (in TGI's envelope when not streaming).
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (422, "Input validation error"), (424, "Generation Error"), (429, "Model is overloaded"),
    (500, "Incomplete generation"))}
