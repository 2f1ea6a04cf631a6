"""`tgserve serve --speculative-model DIR` end to end on the demo model, the draft its first layer
alone (written by `tgserve demo-model DIR --draft-layers 1`): TGI's start-up line with the draft's default of 4, `/info`, streamed greedy ids equal to
transformers' float32 greedy continuation while guesses are accepted (`tgi_request_skipped_tokens`),
the official client, the KV blocks back afterwards, and the flag's environment variable."""
from __future__ import annotations

import argparse
import json
import shutil

import httpx
import pytest
import text_generation  # installed --no-deps by scripts/test.sh, from tests/no-deps-requirements.txt

from tgserve.api import cli
from tgserve.api.cli_flags import add_serve_flags, config_from_args

from .metrics_scrape import is_released, scrape, value, wait_for_metrics
from .test_speculate_e2e import NEW_TOKENS, PROMPT, greedy_ids, stream_events  # noqa: F401 (a fixture)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client calls pydantic's .dict()


@pytest.fixture(scope="module")
def draft_dir(model_dir, tmp_path_factory):
    """`tgserve demo-model DIR --draft-layers 1`, the demo model's training replaced by a copy of it."""
    out_dir = tmp_path_factory.mktemp("draft") / "one-layer"

    def write_demo_model(out, shape=None, *, seed=0, progress=False):
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
        return out

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr("tgserve.checkpoints.demo_model.write_demo_model", write_demo_model)
        assert cli.main(["demo-model", str(out_dir), "--draft-layers", "1"]) == 0
        assert cli.main(["demo-model", str(out_dir.parent / "bad"), "--draft-layers", "2"]) == 1  # all its layers
    assert json.loads((out_dir / "config.json").read_text())["num_hidden_layers"] == 1
    return out_dir


@pytest.fixture(scope="module")
def server(start_server, draft_dir):
    return start_server("--speculative-model", str(draft_dir))


def test_startup_line_and_info(server):
    assert "Using speculation draft with 4 input ids." in server.log()
    assert httpx.get(f"{server.url}/info", timeout=10).json()["speculate"] == 4


def test_stream_equals_greedy_with_accepted_guesses(server, greedy_ids):
    before, _ = scrape(server.url)
    events = stream_events(server.url, details=True, top_n_tokens=2)
    assert [e["token"]["id"] for e in events] == greedy_ids
    assert events[-1]["details"]["generated_tokens"] == len(events) == len(greedy_ids)
    after = wait_for_metrics(server.url, is_released, "the request released its KV blocks")
    num_steps = value(after, "tgi_request_skipped_tokens_count") - value(before, "tgi_request_skipped_tokens_count")
    gained = value(after, "tgi_request_skipped_tokens_sum") - value(before, "tgi_request_skipped_tokens_sum")
    assert gained > 0 and num_steps + gained == len(events)


def test_official_client_greedy_and_seeded(server, greedy_ids):
    client = text_generation.Client(server.url, timeout=120)
    responses = list(client.generate_stream(PROMPT, max_new_tokens=NEW_TOKENS))
    assert [r.token.id for r in responses] == greedy_ids
    seeded = [client.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=True, seed=11, temperature=0.5).generated_text
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    wait_for_metrics(server.url, is_released, "every request released its KV blocks")


def test_environment_variable_names_the_draft():
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    config = config_from_args(parser.parse_args([]), {"SPECULATIVE_MODEL": "/drafts/small"})
    assert config.speculative_model == "/drafts/small" and config.speculate == 4
    config = config_from_args(parser.parse_args(["--speculative-model", "d", "--speculate", "2"]), {})
    assert (config.speculative_model, config.speculate) == ("d", 2)
