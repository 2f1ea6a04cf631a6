"""The generation request every route is translated into, and TGI's error envelope.

TGI's `GenerateRequest` / `GenerateParameters` (`docs/openapi.json`) are the one request shape the
shared lifecycle runs: the native routes parse them directly, the OpenAI routes map their bodies
onto them. Requests are parsed strictly, as TGI's serde does: a string where a number belongs, or a
float where an integer belongs, is a 422, not a silent coercion. Unknown fields are ignored (serde's
default).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_U32 = 2**32 - 1
MAX_U64 = 2**64 - 1
MAX_I32 = 2**31 - 1

_REQUEST_CONFIG = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class GrammarType(BaseModel):
    """Structured-output constraint (`{"type": "json" | "regex" | "json_schema", "value": ...}`)."""

    model_config = _REQUEST_CONFIG
    type: Literal["json", "json_object", "regex", "json_schema"]
    value: Any


class GenerateParameters(BaseModel):
    """TGI's `GenerateParameters`: every omitted field takes its serde default."""

    model_config = _REQUEST_CONFIG
    best_of: int | None = Field(None, ge=0, description="Sample best_of sequences, return the best mean logprob")
    temperature: float | None = Field(None, description="Softmax temperature, > 0")
    repetition_penalty: float | None = Field(None, description="1.0 means no penalty, > 0")
    frequency_penalty: float | None = Field(None, description="In [-2, 2]; 0.0 means no penalty")
    top_k: int | None = Field(None, ge=-MAX_I32 - 1, le=MAX_I32, description="Top-k filtering, > 0")
    top_p: float | None = Field(None, description="Nucleus sampling, in (0, 1]; 1.0 means off")
    typical_p: float | None = Field(None, description="Typical decoding mass, in (0, 1)")
    do_sample: bool = Field(False, description="Activate logits sampling")
    max_new_tokens: int | None = Field(None, ge=0, le=MAX_U32, description="Tokens to generate at most")
    return_full_text: bool | None = Field(None, description="Prepend the prompt to the generated text")
    stop: list[str] = Field(default_factory=list, description="Stop generating at any of these")
    truncate: int | None = Field(None, ge=0, description="Keep only the last `truncate` input tokens")
    watermark: bool = Field(False, description="Kirchenbauer watermark (gamma 0.5, delta 2.0 by default)")
    details: bool = Field(False, description="Return generation details")
    decoder_input_details: bool = Field(False, description="Return prompt token logprobs")
    seed: int | None = Field(None, ge=0, le=MAX_U64, description="Random sampling seed")
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_U32, description="Alternatives per token")
    grammar: GrammarType | None = Field(None, description="Grammar constraint (not supported yet)")
    adapter_id: str | None = Field(None, description="LoRA adapter id (not supported yet)")


def default_parameters() -> GenerateParameters:
    """What TGI applies when a request has no `parameters` at all: note `do_sample: true`."""
    return GenerateParameters(do_sample=True)


class GenerateRequest(BaseModel):
    """Body of POST /generate and /generate_stream."""

    model_config = _REQUEST_CONFIG
    inputs: str
    parameters: GenerateParameters = Field(default_factory=default_parameters)


class ErrorResponse(BaseModel):
    """TGI's error envelope."""

    error: str
    error_type: str
