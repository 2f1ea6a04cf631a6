"""What a caller hands the engine, and what the engine hands back, one token at a time.

These are the engine's public types: api/ builds a `GenerationRequest` from an HTTP payload and
consumes `TokenEvent`s. Nothing here knows about HTTP or devices.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """TGI's next-token chooser parameters, already validated. Neutral values switch a warper off."""

    do_sample: bool = False  # False and no warper active -> greedy argmax
    temperature: float = 1.0  # > 0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    typical_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; divides positive logits of seen tokens (CTRL style)
    frequency_penalty: float = 0.0  # 0.0 = off; subtracts penalty * count / length of each token seen (prompt + generated, as TGI)
    seed: int = 0  # u64; makes a sampled request reproducible whatever else shares its batch
    watermark: bool = False  # Kirchenbauer watermark (tgserve.core.watermark), applied even when greedy, as TGI

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax: no sampling and no warper that implies it."""
        warped = self.temperature != 1.0 or self.top_k != 0 or self.top_p < 1.0 or self.typical_p < 1.0
        return not (self.do_sample or warped)


@dataclass(slots=True, frozen=True)
class StoppingParams:
    """When a request finishes, besides running out of KV budget."""

    max_new_tokens: int  # > 0
    stop_sequences: tuple[str, ...] = ()  # text; the matched stop text stays in the output (TGI)
    ignore_eos_token: bool = False  # benchmarks force exact output lengths with this


@dataclass(slots=True)
class GenerationRequest:
    """One tokenized, validated request. `input_ids` are already truncated to fit the limits."""

    input_ids: list[int]  # prompt token ids, len >= 1
    sampling: SamplingParams
    stopping: StoppingParams
    top_n_tokens: int = 0  # alternatives reported per generated token
    prefill_logprobs: bool = False  # report logprobs of the prompt tokens (decoder_input_details)
    # the output must follow this grammar (a `tgserve.core.grammar.CompiledGrammar`, compiled by the
    # caller through `Engine.grammar_compiler` before submitting); None: unconstrained
    grammar: object = None
    request_id: int = -1  # set by Engine.submit


@dataclass(slots=True, frozen=True)
class TopToken:
    """One alternative token at a generated position."""

    id: int
    text: str
    logprob: float
    special: bool


@dataclass(slots=True, frozen=True)
class Finish:
    """Why and how a request ended; carried by its last event only."""

    reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    seed: int | None  # the seed used when sampling, None when greedy
    text: str  # the whole generated text, special tokens skipped
    queue_s: float = 0.0  # seconds from submit to the first step that computed it
    inference_s: float = 0.0  # seconds from that step to the last token
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache instead of being computed


@dataclass(slots=True, frozen=True)
class TokenEvent:
    """One generated token; the last event of a request also carries `finish`."""

    id: int
    text: str  # this token's text (specials kept), empty until a full UTF-8 character is complete;
    # the last token's also flushes an incomplete final character (U+FFFD), so the texts add up to
    # the tokenizer's decode of the generated ids
    logprob: float
    special: bool
    index: int  # 1-based position among generated tokens
    top_tokens: tuple[TopToken, ...] = ()
    prefill: tuple[TopToken, ...] = ()  # prompt tokens with logprobs, on the first event only
    finish: Finish | None = None
    # On the last event one engine step produced for the request: how many events that step produced
    # (1 + the speculated tokens it accepted, fewer where a stop cut them); 0 on the events before it
    # from the same step. TGI's `tgi_request_skipped_tokens` observes this less one, once per step.
    num_step_tokens: int = 1


@dataclass(slots=True, frozen=True)
class ErrorEvent:
    """The request failed inside the engine (TGI's 424 'generation' error); nothing follows."""

    message: str  # the cause alone; the API adds TGI's "Request failed during generation: " prefix


@dataclass(slots=True)
class ModelInfo:
    """What /info reports about the served model."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_device_type: str
    backend: str
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    quantization: dict | None = None  # method, bits, group_size, is_prequantized, description; None: float
    num_shard: int = 1  # tensor-parallel ranks sharing the model (--num-shard)
