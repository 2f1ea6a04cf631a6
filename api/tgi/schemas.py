"""Response bodies of TGI's native routes (and POST /'s request), mirroring TGI's `docs/openapi.json`.

The request shape shared with the OpenAI routes is in `tgserve.api.shared.schemas`. The response
models document the routes; the hot path builds the same JSON as plain dicts
(`tgserve.api.tgi.responses`), and a test checks that those dicts validate against these models.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from tgserve.api.shared.schemas import GenerateRequest


class CompatGenerateRequest(GenerateRequest):
    """Body of POST / (the Inference API compatible route): a GenerateRequest plus `stream`."""

    stream: bool = False


class Token(BaseModel):
    """One generated token; `text` keeps special tokens, `special` marks them."""

    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    """One prompt token; the first one has no logprob."""

    id: int
    text: str
    logprob: float | None


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class SequenceDetails(BaseModel):
    """What TGI reports about one generated sequence; shared by `details` and best_of candidates."""

    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class BestOfSequence(SequenceDetails):
    """A losing `best_of` candidate: its own text, seed and tokens (`details.best_of_sequences`)."""

    generated_text: str


class Details(SequenceDetails):
    """`details` of a /generate response; `top_tokens` is omitted when empty."""

    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    """Body of a /generate response; `details` is omitted unless asked for."""

    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    """`details` of the last /generate_stream event."""

    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(BaseModel):
    """One /generate_stream event; the last carries `generated_text` (and `details` if asked)."""

    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class Info(BaseModel):
    """Body of GET /info."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str | None = None
    model_device_type: str | None = None
    model_pipeline_tag: str | None = None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None = None
    docker_label: str | None = None
    # tgserve's addition: the weight quantization in use ({"method", "bits", "group_size",
    # "is_prequantized", "description"}), None for float weights.
    quantization: dict | None = None
    # tgserve's addition: --speculate, the tokens proposed and verified per step (0: none). TGI's shard
    # reports it in its Info RPC; its HTTP /info does not.
    speculate: int = 0
    # tgserve's addition: the tensor-parallel ranks sharing the model (--num-shard). TGI's launcher only
    # logs it ("Sharding model on N processes"); clients ignore keys they do not know.
    num_shard: int = 1
