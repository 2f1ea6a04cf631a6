"""Positions past the original window: the engine's logprobs equal transformers' in float32 under YaRN,
dynamic NTK and linear scaling, from the checkpoint's config.json or from TGI's --rope-scaling /
--rope-factor flags.

The trained demo weights get a small original window (64 positions) written into config.json, so a
prompt of a couple of hundred tokens, prefilled in chunks, runs mostly past it. Every prompt token's
logprob (`decoder_input_details`) and every generated token's top-5 logprobs are compared with one
transformers forward over the whole sequence; a reference without the scaling must differ there,
so the comparison could not pass with the scaling ignored.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams

from .engine_harness import run_all, running_engine

WINDOW = 64  # max_position_embeddings written into the test checkpoints
MAX_TOTAL_TOKENS = 256  # the engines' --max-total-tokens: four times the window
NEW_TOKENS = 16
TOLERANCE = 1e-4  # nats; float32, paged attention against transformers' sdpa
_TEXT = ("Once upon a time there was a small garden behind the old house, and every morning the river ran past "
         "the lighthouse on the rock while the children counted numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10. ")

_YARN_QWEN2_CARD = {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": WINDOW}}
_DYNAMIC = {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}
_LINEAR = {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}
_PLAIN = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}

# case -> (architecture, rope of the served checkpoint, server flags, rope transformers runs with)
CASES = {
    "qwen2-yarn-from-config": ("qwen2", _YARN_QWEN2_CARD, {}, _YARN_QWEN2_CARD),
    "llama-yarn-from-config": ("llama", _YARN_QWEN2_CARD, {}, _YARN_QWEN2_CARD),
    "llama-dynamic-from-config": ("llama", _DYNAMIC, {}, _DYNAMIC),
    "qwen2-dynamic-from-flags": ("qwen2", _PLAIN, {"rope_scaling": "dynamic", "rope_factor": 2.0}, _DYNAMIC),
    "qwen2-linear-from-flag": ("qwen2", _YARN_QWEN2_CARD, {"rope_factor": 4.0}, _LINEAR),  # replaces the YaRN
}


def write_checkpoint(demo_dir, out_dir, architecture: str, rope: dict, window: int = WINDOW):
    """The demo weights as a Qwen2 or Llama checkpoint with `window` positions and the given rope block."""
    for path in demo_dir.iterdir():
        shutil.copy(path, out_dir / path.name)
    config = json.loads((demo_dir / "config.json").read_text())
    config.pop("rope_parameters"), config.pop("rope_scaling", None)
    config.update(max_position_embeddings=window, rope_theta=10000.0, **rope)
    if architecture == "llama":  # Qwen2 is Llama with q/k/v biases
        config.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=True, mlp_bias=False)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def _logprobs(model_dir, ids: list[int]) -> torch.Tensor:
    """transformers' float32 log-softmax [len(ids), vocab] over `ids` in one forward (no cache)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _request(ids: list[int], max_new_tokens: int) -> GenerationRequest:
    return GenerationRequest(list(ids), SamplingParams(), StoppingParams(max_new_tokens, ignore_eos_token=True),
                             top_n_tokens=5, prefill_logprobs=True)


def _engine_logprobs(events, num_prompt_tokens: int) -> dict[tuple[int, int], float]:
    """{(position predicted from, token id): logprob} for every prompt token and every top-5 alternative."""
    got = {(position - 1, token.id): token.logprob for position, token in enumerate(events[0].prefill) if position}
    for index, event in enumerate(events):
        got.update({(num_prompt_tokens - 1 + index, top.id): top.logprob for top in event.top_tokens})
    return got


def _max_error(got: dict[tuple[int, int], float], reference: torch.Tensor, first_position: int) -> float:
    return max(abs(value - float(reference[position, token])) for (position, token), value in got.items()
               if position >= first_position)


@pytest.fixture(scope="module")
def prompt_ids(demo_model_dir) -> list[int]:
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(str(demo_model_dir))(_TEXT * 8).input_ids
    assert len(ids) >= MAX_TOTAL_TOKENS
    return ids


@pytest.mark.parametrize("case", list(CASES))
def test_logprobs_past_the_original_window_match_transformers(case, demo_model_dir, prompt_ids, tmp_path):
    architecture, served_rope, flags, reference_rope = CASES[case]
    for name in ("served", "reference", "plain"):
        (tmp_path / name).mkdir()
    served = write_checkpoint(demo_model_dir, tmp_path / "served", architecture, served_rope)
    # Dynamic NTK's base is fixed for the server's longest sequence; transformers' equals it for a
    # sequence of exactly that length, so the long request fills --max-total-tokens to the last token.
    long_prompt = prompt_ids[:MAX_TOTAL_TOKENS - NEW_TOKENS]
    requests = [_request(long_prompt, NEW_TOKENS)]
    is_static = "dynamic" not in case
    if is_static:  # a second, shorter request shares the steps
        requests.append(_request(prompt_ids[:100], 8))
    with running_engine(served, dtype="float32", max_total_tokens=MAX_TOTAL_TOKENS, max_batch_prefill_tokens=48,
                        max_batch_total_tokens=2048, **flags) as engine:
        results = run_all(engine, requests)

    reference_dir = write_checkpoint(demo_model_dir, tmp_path / "reference", architecture, reference_rope)
    plain_dir = write_checkpoint(demo_model_dir, tmp_path / "plain", architecture, _PLAIN, window=MAX_TOTAL_TOKENS)
    for req, result in zip(requests, results):
        num_prompt = len(req.input_ids)
        ids = req.input_ids + result.ids
        assert len(result.ids) == req.stopping.max_new_tokens
        reference = _logprobs(reference_dir, ids)
        got = _engine_logprobs(result.events, num_prompt)
        assert len(got) >= num_prompt - 1 + len(result.ids) * 5
        print("ERR", case, _max_error(got, reference, 0), _max_error(got, _logprobs(plain_dir, ids), WINDOW))
        assert _max_error(got, reference, 0) < TOLERANCE, case
        for index, token_id in enumerate(result.ids):  # greedy: the argmax, up to float32 near-ties
            row = reference[num_prompt - 1 + index]
            assert token_id == int(row.argmax()) or float(row.max() - row[token_id]) < TOLERANCE
        # Without the scaling the same weights give other logprobs past the window: the check has teeth.
        assert _max_error(got, _logprobs(plain_dir, ids), WINDOW) > 100 * TOLERANCE, case
