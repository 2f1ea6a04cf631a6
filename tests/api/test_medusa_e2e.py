"""A Medusa checkpoint served end to end: `tgserve demo-model DIR --medusa-heads 3` writes TGI's
Medusa layout (base_model_name_or_path: tgserve/demo-qwen2), `tgserve serve --model-id DIR` serves
the base model with the heads guessing: TGI's start-up line, `/info` speculate = the head count, a
streamed request equal to transformers' float32 greedy ids on the base model (the oracle) whose
guesses were accepted (`tgi_request_skipped_tokens`), the official client, and TGI's start-up error
for `--speculate` above the head count."""
from __future__ import annotations

import json
import subprocess

import httpx
import pytest
import text_generation
import torch
from transformers import AutoModelForCausalLM

from .conftest import TEST_SERVER_FLAGS, server_factory, tgserve_command, tgserve_env
from .metrics_scrape import is_released, scrape, value, wait_for_metrics

NUM_HEADS = 3
PROMPT = "The lighthouse stands on a rock at the end of the long grey pier. Every evening the keeper"
NEW_TOKENS = 40
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client calls pydantic's .dict()


@pytest.fixture(scope="module")
def medusa_cli_dir(model_dir, tmp_path_factory, run_cli_module):
    """The Medusa checkpoint the CLI writes (its base: the session's demo model, via TGSERVE_CACHE)."""
    out = tmp_path_factory.mktemp("medusa-cli") / "heads"
    result = run_cli_module("demo-model", str(out), "--medusa-heads", str(NUM_HEADS))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["base_model_name_or_path"] == "tgserve/demo-qwen2"
    return out


@pytest.fixture(scope="module")
def run_cli_module():
    """Run `tgserve ARGS` to completion (the module's fixtures need it before a test's `run_cli`)."""

    def run(*args: str, timeout_s: float = 300.0):
        return subprocess.run(tgserve_command(*args), capture_output=True, text=True, timeout=timeout_s,
                              env=tgserve_env())
    return run


@pytest.fixture(scope="module")
def server(medusa_cli_dir, tmp_path_factory):
    with server_factory(tmp_path_factory, *TEST_SERVER_FLAGS) as start:
        yield start(medusa_cli_dir)


@pytest.fixture(scope="module")
def greedy_ids(model_dir, hf_tokenizer) -> list[int]:
    """transformers' float32 greedy continuation of PROMPT on the base model (stopping at eos)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = hf_tokenizer(PROMPT).input_ids
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=hf_tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def test_startup_line_and_info(server, medusa_cli_dir):
    assert f"Using speculation medusa with {NUM_HEADS} input ids." in server.log()
    info = httpx.get(f"{server.url}/info", timeout=10).json()
    assert info["speculate"] == NUM_HEADS and info["model_id"] == str(medusa_cli_dir)


def test_stream_equals_greedy_and_guesses_are_accepted(server, greedy_ids):
    before, _ = scrape(server.url)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
    with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = [json.loads(line[len("data:"):]) for line in response.iter_lines() if line.startswith("data:")]
    assert [e["token"]["id"] for e in events] == greedy_ids
    after = wait_for_metrics(server.url, is_released, "the request released its KV blocks")
    num_steps = value(after, "tgi_request_skipped_tokens_count") - value(before, "tgi_request_skipped_tokens_count")
    gained = value(after, "tgi_request_skipped_tokens_sum") - value(before, "tgi_request_skipped_tokens_sum")
    assert gained > 0 and num_steps + gained == len(events)


def test_official_client(server, greedy_ids):
    client = text_generation.Client(server.url, timeout=120)
    generated = client.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert [t.id for t in generated.details.tokens] == greedy_ids
    seeded = [client.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=True, seed=11, temperature=0.5).generated_text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_speculate_above_the_head_count_fails_at_start(medusa_cli_dir, run_cli_module):
    result = run_cli_module("serve", "--backend", "cpu", "--model-id", str(medusa_cli_dir),
                            "--speculate", str(NUM_HEADS + 1))
    assert result.returncode == 1
    assert (f"Speculate is set to `{NUM_HEADS + 1}` but this medusa models only has `{NUM_HEADS}` heads, "
            "please make them match") in result.stderr


def test_medusa_heads_are_for_the_demo_model_or_smollm2_only(tmp_path, capsys):
    from tgserve.api import cli

    assert cli.main(["demo-model", str(tmp_path), "--medusa-heads", "2", "--shape", "qwen2-7b"]) == 1
    assert "does not combine with --shape" in capsys.readouterr().err
    assert cli.main(["demo-model", str(tmp_path), "--medusa-heads", "0"]) == 1
    assert not any(tmp_path.iterdir())
