"""OpenAI request fields -> TGI's `GenerateParameters`, as TGI's `try_into_generate` maps them.

The OpenAI routes then run the same validation (`check_parameters`, `fit_input_ids`), engine path
and limiter as /generate. Where the mapping differs from TGI it says so:

- `presence_penalty`: TGI turns it into `repetition_penalty = presence_penalty + 2.0`, so the
  OpenAI default 0.0 becomes a strong repetition penalty. tgserve checks its range and refuses a
  non-zero value until the core samples with a real presence penalty.
- `n` > 1, `logit_bias`: TGI ignores them; tgserve refuses them with a 422 rather than ignore them.
- `response_format`: OpenAI's json_object / json_schema, and TGI's grammar form, constrain the output
  (`tgserve.api.shared.grammar`); on /v1/completions too. `tools`: `tgserve.api.openai.tools`.
- `max_tokens` null: whatever fits in `max_total_tokens`, as a null `max_new_tokens` on /generate
  (some TGI versions default to 100 here).
"""
from __future__ import annotations

from typing import NoReturn

from tgserve.api.openai.schemas import ChatRequest, CompletionRequest, SamplingFields
from tgserve.api.openai.tools import ToolPlan, plan_tools
from tgserve.api.shared.errors import ApiError, validation_error
from tgserve.api.shared.grammar import response_format_grammar
from tgserve.api.shared.schemas import GenerateParameters, GrammarType
from tgserve.core.grammar.spec import GrammarError



def _not_supported(what: str) -> NoReturn:
    raise validation_error(f"{what} is not supported by tgserve yet")


def check_common_fields(body: SamplingFields) -> None:
    """Refuse what neither OpenAI route can honour; raises `ApiError` 422."""
    if body.n is not None and body.n != 1:
        raise validation_error(f"only `n` = 1 is supported. Given: {body.n}")
    if body.logit_bias:
        _not_supported("`logit_bias`")
    penalty = body.presence_penalty
    if penalty is not None and not -2.0 <= penalty <= 2.0:
        raise validation_error("`presence_penalty` must be >= -2.0 and <= 2.0")
    if penalty:
        _not_supported("a non-zero `presence_penalty`")


def check_chat_fields(body: ChatRequest) -> ToolPlan | None:
    """`check_common_fields` plus the chat-only fields; returns the tools the answer may call (None:
    a text answer). Raises `ApiError` 422."""
    check_common_fields(body)
    return plan_tools(body.tools, body.tool_choice, has_grammar=response_grammar(body) is not None)


def check_completion_fields(body: CompletionRequest, max_client_batch_size: int) -> None:
    """`check_common_fields` plus TGI's /v1/completions checks (suffix, number of prompts)."""
    if body.suffix is not None:
        raise ApiError(422, "suffix not supported",
                       "Suffix is not supported and can be achieved by preprocessing the prompt.")
    if isinstance(body.prompt, list) and len(body.prompt) > max_client_batch_size:
        raise ApiError(422, "batch size exceeded",
                       f"Number of prompts exceeds the maximum allowed batch size of {max_client_batch_size}")
    if body.prompt == []:
        raise validation_error("`prompt` cannot be an empty list")
    check_common_fields(body)
    if body.best_of is not None and body.best_of != 1:
        raise validation_error(f"only `best_of` = 1 is supported on /v1/completions. Given: {body.best_of}")
    if body.echo and body.logprobs is not None:
        _not_supported("`echo` with `logprobs` (prompt logprobs)")


def _sampling_mode(temperature: float | None) -> tuple[bool, float | None]:
    """(do_sample, temperature): TGI samples unless temperature is exactly 0."""
    if temperature == 0.0:
        return False, None
    return True, temperature


def _stop_list(stop: str | list[str] | None) -> list[str]:
    """OpenAI's string-or-list `stop`, without empty strings (they would match before any text)."""
    if stop is None:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


def response_grammar(body: SamplingFields) -> GrammarType | None:
    """The body's `response_format` as TGI's `grammar`; raises `ApiError` 422 for one it cannot be."""
    try:
        return response_format_grammar(body.response_format)
    except GrammarError as error:
        raise validation_error(str(error)) from None


def chat_parameters(body: ChatRequest, tool_plan: ToolPlan | None = None) -> GenerateParameters:
    """The /generate parameters of a (checked) chat request; its grammar is the tools' when it has any."""
    do_sample, temperature = _sampling_mode(body.temperature)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return GenerateParameters(
        temperature=temperature, frequency_penalty=body.frequency_penalty, top_p=body.top_p,
        do_sample=do_sample, max_new_tokens=max_tokens, stop=_stop_list(body.stop), seed=body.seed,
        top_n_tokens=body.top_logprobs if body.logprobs else None, details=True,
        grammar=tool_plan.grammar() if tool_plan is not None else response_grammar(body))


def completion_parameters(body: CompletionRequest) -> GenerateParameters:
    """The /generate parameters of each prompt of a (checked) completions request."""
    do_sample, temperature = _sampling_mode(body.temperature)
    return GenerateParameters(
        temperature=temperature, repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty, top_p=body.top_p, do_sample=do_sample,
        max_new_tokens=body.max_tokens, stop=_stop_list(body.stop), seed=body.seed,
        top_n_tokens=body.logprobs, details=True, grammar=response_grammar(body))
