"""TGI's request validation (`router/src/validation.rs`), in TGI's order and with its messages.

Pure functions, no I/O: `check_parameters` runs before tokenization, `fit_input_ids` after it.
Each raises `ValidationError` whose message is TGI's text without the "Input validation error: "
prefix (the error envelope adds it). Where tgserve deliberately differs from TGI it says so here.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable

from tgserve.api.shared.schemas import GenerateParameters
from tgserve.api.shared.grammar import grammar_spec
from tgserve.core.grammar.spec import GrammarError, GrammarSpec
from tgserve.core.request import SamplingParams


GENERATION_CHUNK_TOKENS = 1024  # TGI's DEFAULT_GENERATION_LENGTH (router/src/infer/mod.rs)


class ValidationError(Exception):
    """A request TGI would reject with 422 / error_type "validation"; str() is TGI's message.

    Not a `ValueError`: only this type (and the engine's `RequestRejected`) means "the client's fault".
    """


@dataclass(slots=True, frozen=True)
class ValidationLimits:
    """The server limits validation checks against (launcher flags and start-up results)."""

    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: int
    max_total_tokens: int


@dataclass(slots=True, frozen=True)
class CheckedParameters:
    """Validated parameters, with TGI's defaults filled in; tokens still to be counted."""

    sampling: SamplingParams
    max_new_tokens: int | None  # None: whatever fits in max_total_tokens
    stop_sequences: tuple[str, ...]
    truncate: int | None  # keep the last `truncate` input tokens
    top_n_tokens: int
    best_of: int = 1  # candidates to sample; the one with the best mean logprob is answered
    grammar: GrammarSpec | None = None  # the output must follow it (compiled by `prepare`)


def random_seed() -> int:
    """The seed of a request that sets none (TGI draws a random u64): 63 random bits, so it fits
    the OpenAPI `seed` format (int64) that generated clients rely on; the sampler uses 63 bits."""
    return secrets.randbits(63)


def check_stream_parameters(params: GenerateParameters) -> None:
    """The checks /generate_stream makes before anything else (they need no limits)."""
    if params.best_of is not None and params.best_of != 1:
        raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    if params.decoder_input_details:
        raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")


def check_best_of(best_of: int, max_best_of: int) -> None:
    """TGI's `validate_best_of`, run for best_of > 1 on /generate."""
    if max_best_of == 1 and best_of != 1:
        raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
    if best_of > max_best_of:
        raise ValidationError(f"`best_of` must be > 0 and <= {max_best_of}. Given: {best_of}")


def check_parameters(inputs: str, params: GenerateParameters, limits: ValidationLimits,
                     draw_seed: Callable[[], int] = random_seed) -> CheckedParameters:
    """Validate everything that does not need the token count, in TGI's order.

    draw_seed: source of the seed when the request sets none (`random_seed`; TGI draws a u64 always;
        the engine reports it in details.seed only when the request samples).
    """
    best_of = params.best_of if params.best_of is not None else 1
    if best_of > 1:
        check_best_of(best_of, limits.max_best_of)
    is_sampling = params.do_sample or any(
        v is not None for v in (params.temperature, params.top_k, params.top_p, params.typical_p))
    if best_of > 1 and not is_sampling:
        raise ValidationError("you must use sampling when `best_of` is > 1")
    sampling = _check_sampling(params)
    if params.max_new_tokens == 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    if len(params.stop) > limits.max_stop_sequences:
        raise ValidationError(f"`stop` supports up to {limits.max_stop_sequences} stop sequences. "
                              f"Given: {len(params.stop)}")
    if params.seed is not None and best_of > 1:
        raise ValidationError("`seed` must not be set when `best_of` > 1")
    seed = params.seed if params.seed is not None else draw_seed()
    top_n_tokens = params.top_n_tokens or 0
    if top_n_tokens > limits.max_top_n_tokens:
        raise ValidationError(f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. "
                              f"Given: {top_n_tokens}")
    if not inputs:
        raise ValidationError("`inputs` cannot be empty")
    if params.truncate is not None and not 0 < params.truncate <= limits.max_input_tokens:
        raise ValidationError(f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. "
                              f"Given: {params.truncate}")
    check_supported(params)
    try:
        grammar = grammar_spec(params.grammar) if params.grammar is not None else None
    except GrammarError as error:
        raise ValidationError(str(error)) from None
    return CheckedParameters(
        sampling=SamplingParams(do_sample=params.do_sample, seed=seed, watermark=params.watermark, **sampling),
        max_new_tokens=params.max_new_tokens, stop_sequences=tuple(params.stop),
        truncate=params.truncate, top_n_tokens=top_n_tokens, best_of=max(best_of, 1),
        grammar=grammar)


def _check_sampling(params: GenerateParameters) -> dict[str, float | int]:
    """Warper and penalty values with their neutral defaults.

    tgserve accepts top_p == 1.0 (meaning off), which TGI rejects (TGI issue #2222): OpenAI
    clients send it routinely. typical_p keeps TGI's open interval.
    """
    temperature = 1.0 if params.temperature is None else params.temperature
    if temperature <= 0.0:
        raise ValidationError("`temperature` must be strictly positive")
    repetition_penalty = 1.0 if params.repetition_penalty is None else params.repetition_penalty
    if repetition_penalty <= 0.0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    frequency_penalty = 0.0 if params.frequency_penalty is None else params.frequency_penalty
    if not -2.0 <= frequency_penalty <= 2.0:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    top_p = 1.0 if params.top_p is None else params.top_p
    if not 0.0 < top_p <= 1.0:
        raise ValidationError("`top_p` must be > 0.0 and <= 1.0")
    typical_p = 1.0 if params.typical_p is None else params.typical_p
    if params.typical_p is not None and not 0.0 < typical_p < 1.0:
        raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
    top_k = 0 if params.top_k is None else params.top_k
    if params.top_k is not None and top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    return dict(temperature=temperature, repetition_penalty=repetition_penalty,
                frequency_penalty=frequency_penalty, top_p=top_p, typical_p=typical_p, top_k=top_k)


def check_supported(params: GenerateParameters) -> None:
    """Refuse valid TGI features tgserve does not implement yet, rather than ignore them."""
    if params.adapter_id is not None:
        raise ValidationError("`adapter_id` is not supported by tgserve yet")


def fit_input_ids(input_ids: list[int], truncate: int | None, max_new_tokens: int | None,
                  limits: ValidationLimits) -> tuple[list[int], int]:
    """Truncate the prompt (keeping its end) and check it against the token budget.

    Returns (input_ids, max_new_tokens); a null max_new_tokens becomes what is left of
    max_total_tokens, as TGI does. Like TGI, the budget check counts at most
    `GENERATION_CHUNK_TOKENS` new tokens (TGI schedules longer requests in 1024-token chunks), so
    max_new_tokens=4096 after a short prompt is accepted, not a 422; the generation then ends with
    finish_reason "length" at max_total_tokens. (TGI stops at the end of the last whole chunk that
    still fits, when re-validating the next chunk fails; tgserve runs on to the budget itself; see
    the README's deliberate differences.)
    """
    if truncate is not None and len(input_ids) > truncate:
        input_ids = input_ids[len(input_ids) - truncate:]
    input_length = len(input_ids)
    budget = max(limits.max_total_tokens - input_length, 0)
    if max_new_tokens is None:
        max_new_tokens = budget
    checked_new_tokens = min(max_new_tokens, GENERATION_CHUNK_TOKENS)
    if input_length + checked_new_tokens > limits.max_total_tokens:
        raise ValidationError(f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                              f"Given: {input_length} `inputs` tokens and {checked_new_tokens} `max_new_tokens`")
    if input_length > limits.max_input_tokens:
        raise ValidationError(f"`inputs` must have less than {limits.max_input_tokens} tokens. "
                              f"Given: {input_length}")
    return input_ids, min(max_new_tokens, budget)
