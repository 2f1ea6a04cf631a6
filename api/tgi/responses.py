"""Engine events -> TGI's JSON bodies, as plain dicts (the per-token path avoids pydantic).

Shapes follow `tgserve.api.tgi.schemas` exactly: `top_tokens` and `details` are omitted where TGI
omits them, and a logprob that is not a finite number (the first prompt token has none) is
written as null, as serde_json writes NaN.
"""
from __future__ import annotations

import math
from typing import Sequence

from tgserve.api.shared.collected import CollectedGeneration
from tgserve.core.request import TokenEvent, TopToken


def _logprob(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def token_json(token: TokenEvent | TopToken) -> dict:
    """TGI's `Token`: {id, text, logprob, special}."""
    return {"id": token.id, "text": token.text, "logprob": _logprob(token.logprob), "special": token.special}


def prefill_token_json(token: TopToken) -> dict:
    """TGI's `PrefillToken`: {id, text, logprob}."""
    return {"id": token.id, "text": token.text, "logprob": _logprob(token.logprob)}


def generate_response_json(collected: CollectedGeneration, *, prompt_prefix: str, details: bool,
                           top_n_tokens: int, best_of_sequences: Sequence[CollectedGeneration] = ()) -> dict:
    """Body of a /generate answer. `prompt_prefix` is the prompt when return_full_text, else "".

    best_of_sequences: the losing best_of candidates, reported in `details` (omitted when none).
    """
    finish = collected.finish
    assert finish is not None, "only finished generations are answered"
    body: dict = {"generated_text": prompt_prefix + finish.text}
    if details:
        body["details"] = details_json(collected, top_n_tokens)
        if best_of_sequences:
            body["details"]["best_of_sequences"] = [
                {"generated_text": prompt_prefix + other.finish.text, **details_json(other, top_n_tokens)}
                for other in best_of_sequences]
    return body


def details_json(collected: CollectedGeneration, top_n_tokens: int) -> dict:
    """TGI's `Details` without best_of_sequences; with generated_text, also a `BestOfSequence`."""
    finish = collected.finish
    assert finish is not None
    details: dict = {
        "finish_reason": finish.reason,
        "generated_tokens": finish.generated_tokens,
        "seed": finish.seed,
        "prefill": [prefill_token_json(t) for t in collected.prefill],
        "tokens": [token_json(t) for t in collected.tokens],
    }
    if top_n_tokens > 0:
        details["top_tokens"] = [[token_json(t) for t in event.top_tokens] for event in collected.tokens]
    return details


def stream_event_json(event: TokenEvent, *, prompt_prefix: str, details: bool, input_length: int) -> dict:
    """One /generate_stream event; the last one carries generated_text and (if asked) details."""
    body: dict = {"index": event.index, "token": token_json(event)}
    if event.top_tokens:
        body["top_tokens"] = [token_json(t) for t in event.top_tokens]
    finish = event.finish
    body["generated_text"] = None if finish is None else prompt_prefix + finish.text
    body["details"] = None
    if finish is not None and details:
        body["details"] = {"finish_reason": finish.reason, "generated_tokens": finish.generated_tokens,
                           "seed": finish.seed, "input_length": input_length}
    return body
