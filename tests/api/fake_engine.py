"""A scripted engine for tests of the app's plumbing that never needs a generated token.

It echoes the prompt back one character per token. Left in use where generation is beside the
point and no model is worth loading: API keys and CORS (`test_auth.py`, requests refused or let
through before the engine) and a chat template refused before tokenization
(`test_openai_chat_template.py`). Everything about generation, errors from the engine, cancellation
and disconnects is tested on the real engine (`test_engine_faults.py`, `test_disconnect.py`,
`test_contract.py`, `test_e2e_generate.py`, `test_e2e_limits.py`).
"""
from __future__ import annotations

import asyncio

from tgserve.core.config import ServerConfig
from tgserve.core.limits import RuntimeLimits
from tgserve.core.request import Finish, ModelInfo, TokenEvent, TopToken


class CharTokenizer:
    """One token per character."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


class FakeEngine:
    """Echoes the prompt back one character per token."""

    def __init__(self, **config):
        self.config = ServerConfig(**config)
        self.limits = RuntimeLimits(max_input_tokens=64, max_total_tokens=128, max_batch_prefill_tokens=128,
                                    max_batch_total_tokens=1024, max_batch_size=None, num_blocks=65, block_size=16)
        self.model_info = ModelInfo("fake/echo", "abc123", "float32", "cpu", "fake")
        self.tokenizer = CharTokenizer()
        self.is_healthy = True
        self.num_used_kv_blocks = 0  # read by /metrics (tgserve_kv_cache_blocks_used)

    def start(self) -> None:
        pass

    def set_observer(self, observer) -> None:
        self.observer = observer  # the app's metrics observer; this fake runs no steps to report

    def shutdown(self, drain_timeout_s: float) -> None:
        pass

    async def stream(self, request):
        for index in range(1, request.stopping.max_new_tokens + 1):
            await asyncio.sleep(0)
            token_id = request.input_ids[(index - 1) % len(request.input_ids)]
            is_done = index == request.stopping.max_new_tokens
            finish = Finish("length", index, None, "".join(chr(t) for t in (request.input_ids * index)[:index]),
                            queue_s=0.001, inference_s=0.002) if is_done else None
            yield TokenEvent(token_id, chr(token_id), -0.5, False, index,
                             top_tokens=(TopToken(token_id, chr(token_id), -0.5, False),) * request.top_n_tokens,
                             finish=finish)
