"""Multi-turn conversations for the serving benchmark: the workload prefix caching is for.

Every conversation opens with the same system text (`--prefix-len` tokens), then takes turns: a user
text (`--input-len` tokens) and the server's answer (`--output-len` tokens asked for). A turn's prompt
is the whole conversation so far, the server's own earlier answers included, so turn k + 1 starts
with everything turn k sent and received, and every conversation starts with the shared system text.
Conversations run concurrently (each starts at its arrival time); the turns of one run one after
another, each sent when the answer before it has ended. Prompts are plain text in one layout
(`SYSTEM\\n\\nUser: ...\\nAssistant: ...`), sent as `inputs`, `prompt` or one user message by the route.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import httpx

from tgserve.benchmark.datasets import SampleRequest, TextTokenizer, count_tokens, random_dataset
from tgserve.benchmark.metrics_serve import RequestOutput
from tgserve.benchmark.serve_backends import Backend, send_request

USER = "\n\nUser: "
ASSISTANT = "\nAssistant:"


@dataclass(frozen=True, slots=True)
class Conversation:
    system: str  # the text every conversation opens with
    user_turns: tuple[str, ...]  # [num_turns]
    num_output_tokens: tuple[int, ...]  # [num_turns] max_new_tokens of each answer


def multiturn_dataset(num_conversations: int, num_turns: int, prefix_len: int, input_len: int, output_len: int,
                      range_ratio: float = 0.0, seed: int = 0,
                      tokenizer: TextTokenizer | None = None) -> list[Conversation]:
    """`num_conversations` conversations of `num_turns` turns sharing one `prefix_len`-token system text;
    user texts of about `input_len` tokens (random, as `random_dataset`'s), deterministic by seed."""
    if num_turns <= 0:
        raise ValueError("--num-turns must be > 0")
    system = random_dataset(1, prefix_len, 1, seed=seed + 1, tokenizer=tokenizer)[0].prompt if prefix_len else ""
    turns = random_dataset(num_conversations * num_turns, input_len, output_len, range_ratio, 0, seed, tokenizer)
    return [Conversation(system, tuple(t.prompt for t in turns[i:i + num_turns]),
                         tuple(t.num_output_tokens for t in turns[i:i + num_turns]))
            for i in range(0, len(turns), num_turns)]


async def run_conversation(client: httpx.AsyncClient, backend: Backend, base_url: str, model: str | None,
                           conversation: Conversation, force_output_len: bool, tokenizer: TextTokenizer | None,
                           semaphore: asyncio.Semaphore | None) -> list[RequestOutput]:
    """Every turn of `conversation` in order, each prompt the conversation so far; the outputs in turn order.
    A failed turn ends the conversation there (the later turns are recorded as failed, not sent)."""
    prompt, outputs = conversation.system, []
    for user_text, num_output_tokens in zip(conversation.user_turns, conversation.num_output_tokens):
        prompt += USER + user_text + ASSISTANT
        sample = SampleRequest(prompt, count_tokens(prompt, tokenizer), num_output_tokens)
        if outputs and not outputs[-1].is_success:
            outputs.append(RequestOutput(error="an earlier turn of the conversation failed",
                                         num_prompt_tokens=sample.num_prompt_tokens,
                                         num_requested_output_tokens=num_output_tokens))
            continue
        async with semaphore or contextlib.nullcontext():
            output = await send_request(client, backend, base_url, model, sample, force_output_len)
        outputs.append(output)
        prompt += output.generated_text
    return outputs
