"""`tgserve serve --num-shard N` end to end on the demo model (4 query heads, 2 KV heads): real rank
processes over gloo, real HTTP.

Oracle: the same server with one shard. Sharding changes only the summation order of float32
partial sums, so greedy ids are identical and logprobs agree to float32 rounding. Requests run
concurrently (prefills and decodes share steps), one asks for prompt logprobs (the rows the other
ranks compute logits for before the sampled rows) and one for top tokens; TGI's and OpenAI's clients
read the sharded server too. The failure drills: 3 shards
cannot split 4 heads (start fails with the counts that work), a rank killed with SIGKILL ends the
server within 10 s naming the rank, and SIGTERM stops every rank. Each server runs in its own session,
so "no process left behind" is "its process group is empty".
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
import text_generation  # installed --no-deps by scripts/test.sh, from tests/no-deps-requirements.txt

from .conftest import TEST_SERVER_FLAGS, ServerProcess, free_port
from .metrics_scrape import scrape, value

# Different lengths and texts (one repeating itself, so n-gram guesses get accepted under --speculate).
PROMPTS = ("Hello there", "The river ran past the mill. The river ran past the mill. The river ran",
           "Once upon a time", "Add a little oil to the pan and")
NEW_TOKENS = 24
LOST_RANK_EXIT_S = 10.0  # the bound: a rank killed while serving ends the server within this
GROUP_EMPTY_S = 5.0  # after the server exits, its process group may take this long to be empty
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # text_generation calls pydantic's .dict()


def shard_flags(num_shard: int) -> tuple[str, ...]:
    """--num-shard with a free rendezvous port (servers of this module may run side by side)."""
    return ("--num-shard", str(num_shard), "--master-port", str(free_port()), "--enable-prefill-logprobs",
            "--prometheus-port", "0")


@pytest.fixture(scope="module")
def one_shard(start_server) -> ServerProcess:
    return start_server(*shard_flags(1))


def generate(url: str, prompt: str, index: int) -> dict:
    """Greedy details of `prompt`: the first request also asks for prompt logprobs, the second for top tokens."""
    parameters = {"max_new_tokens": NEW_TOKENS, "details": True, "decoder_input_details": index == 0,
                  "top_n_tokens": 2 if index == 1 else None}
    response = httpx.post(f"{url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["details"]


def generate_all(url: str) -> list[dict]:
    """Every prompt at once, so the server batches them into shared steps."""
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(generate, [url] * len(PROMPTS), PROMPTS, range(len(PROMPTS))))


def assert_same_generation(sharded: list[dict], reference: list[dict]) -> None:
    for got, want in zip(sharded, reference):
        assert [t["id"] for t in got["tokens"]] == [t["id"] for t in want["tokens"]]
        assert [t["logprob"] for t in got["tokens"]] == pytest.approx([t["logprob"] for t in want["tokens"]],
                                                                      abs=1e-4)
    prefill, want_prefill = sharded[0]["prefill"], reference[0]["prefill"]
    assert len(prefill) == len(want_prefill) > 2
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx([t["logprob"] for t in want_prefill[1:]], abs=1e-4)
    top = [[alt["id"] for alt in alternatives] for alternatives in sharded[1]["top_tokens"]]
    assert len(top) == NEW_TOKENS
    assert top == [[alt["id"] for alt in alternatives] for alternatives in reference[1]["top_tokens"]]


def client_outputs(server: ServerProcess) -> tuple[list[int], list[int], str]:
    """Greedy ids from TGI's `text_generation` client (whole and streamed) and OpenAI's completion text."""
    client = text_generation.Client(server.url, timeout=120)
    ids = [t.id for t in client.generate(PROMPTS[2], max_new_tokens=NEW_TOKENS).details.tokens]
    streamed = [r.token.id for r in client.generate_stream(PROMPTS[2], max_new_tokens=NEW_TOKENS)]
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0) as oai:
        completion = oai.completions.create(model="tgi", prompt=PROMPTS[2], max_tokens=NEW_TOKENS, temperature=0)
    return ids, streamed, completion.choices[0].text


def group_processes(server: ServerProcess) -> list[psutil.Process]:
    """Live processes of the server's process group (it runs in its own session)."""
    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == server.process.pid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


def wait_group_empty(server: ServerProcess) -> list[psutil.Process]:
    deadline = time.monotonic() + GROUP_EMPTY_S
    while (left := group_processes(server)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def rank_processes(server: ServerProcess) -> list[psutil.Process]:
    """The server's spawned ranks (its children running multiprocessing's spawn_main)."""
    return [child for child in psutil.Process(server.process.pid).children()
            if "spawn_main" in " ".join(child.cmdline())]


def assert_decode_step_collectives(sharded: ServerProcess, one_shard: ServerProcess, model_config: dict) -> None:
    """A decode step communicates exactly: the plan's header and payload broadcasts, the embedding's
    all-reduce, two all-reduces per layer (o_proj, down_proj) and one logits gather; /metrics counts
    them and times them as part of the forward. One shard has no such series."""
    samples, _ = scrape(sharded.url)
    num_steps = value(samples, "tgi_batch_inference_count", method="decode")
    assert num_steps > 0
    per_step = 2 + 1 + 2 * model_config["num_hidden_layers"] + 1
    assert value(samples, "tgserve_batch_collectives", method="decode") == num_steps * per_step
    collective_s = value(samples, "tgserve_batch_collective_duration_sum", method="decode")
    assert 0 < collective_s < value(samples, "tgi_batch_forward_duration_sum", method="decode")
    unsharded, _ = scrape(one_shard.url)
    assert not [name for name, _labels in unsharded if name.startswith("tgserve_batch_collective")]


def constrained(url: str) -> list[int]:
    """Greedy ids of a JSON-schema-constrained request, checked to parse as the schema's object."""
    schema = {"type": "object", "required": ["pet"], "additionalProperties": False,
              "properties": {"pet": {"enum": ["cat", "dog"]}}}
    response = httpx.post(f"{url}/generate", json={"inputs": PROMPTS[0], "parameters": {
        "max_new_tokens": NEW_TOKENS, "details": True, "grammar": {"type": "json", "value": schema}}}, timeout=120)
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["generated_text"])["pet"] in ("cat", "dog")
    return [t["id"] for t in response.json()["details"]["tokens"]]


def assert_killed_rank_ends_the_server(server: ServerProcess) -> None:
    """SIGKILL of the server's rank 1 ends the server within LOST_RANK_EXIT_S, naming it; nothing is left."""
    [rank] = rank_processes(server)
    rank.send_signal(signal.SIGKILL)
    killed_s = time.monotonic()
    try:
        returncode = server.process.wait(timeout=LOST_RANK_EXIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server still runs {LOST_RANK_EXIT_S}s after its rank 1 was killed:\n{server.log()[-2000:]}")
    assert returncode == 1 and time.monotonic() - killed_s < LOST_RANK_EXIT_S
    assert "rank 1 was killed by SIGKILL" in server.log()
    assert wait_group_empty(server) == []


def test_two_shards_serve_one_shard_ids_and_a_killed_rank_ends_the_server(start_server, one_shard, model_dir):
    sharded = start_server(*shard_flags(2))
    assert "Sharding model on 2 processes" in sharded.log()
    assert httpx.get(f"{sharded.url}/info", timeout=10).json()["num_shard"] == 2
    assert httpx.get(f"{one_shard.url}/info", timeout=10).json()["num_shard"] == 1
    reference = generate_all(one_shard.url)
    first = generate_all(sharded.url)
    assert_same_generation(first, reference)
    # A repeat reuses the blocks rank 0's prefix cache names, which every rank holds the same K/V in.
    cached_before = value(scrape(sharded.url)[0], "tgserve_request_cached_tokens")
    again = generate(sharded.url, PROMPTS[1], 2)
    assert [t["id"] for t in again["tokens"]] == [t["id"] for t in first[1]["tokens"]]
    assert value(scrape(sharded.url)[0], "tgserve_request_cached_tokens") - cached_before >= 16
    ids, streamed, text = client_outputs(sharded)
    assert ids == streamed == [t["id"] for t in reference[2]["tokens"]]
    assert (ids, streamed, text) == client_outputs(one_shard)
    assert_decode_step_collectives(sharded, one_shard, json.loads((model_dir / "config.json").read_text()))
    assert constrained(sharded.url) == constrained(one_shard.url)  # rank 0 masks and samples, the others follow
    assert_killed_rank_ends_the_server(sharded)


def test_four_shards_replicating_kv_heads_with_ngram_speculation_stop_on_sigterm(start_server, one_shard):
    """4 ranks over 2 KV heads: each KV head (and its cache) lives on two ranks; verification rows of
    n-gram guesses are just more rows of the broadcast step. SIGTERM then stops all four."""
    sharded = start_server(*shard_flags(4), "--speculate", "2")
    assert "Using speculation n-gram with 2 input ids." in sharded.log()
    assert len(rank_processes(sharded)) == 3
    assert_same_generation(generate_all(sharded.url), generate_all(one_shard.url))
    assert sharded.terminate() == 0
    assert wait_group_empty(sharded) == []


def test_killed_rank_zero_takes_its_ranks_with_it(start_server):
    """SIGKILL of the server itself (rank 0, as the OOM killer would): its spawned rank notices its
    parent is gone and exits, so no rank holds memory (a GPU's, on a GPU server) after the server."""
    server = start_server(*shard_flags(2))
    [rank] = rank_processes(server)
    server.process.send_signal(signal.SIGKILL)
    killed_s = time.monotonic()
    try:
        rank.wait(timeout=LOST_RANK_EXIT_S)
    except psutil.TimeoutExpired:
        pytest.fail(f"rank 1 still runs {LOST_RANK_EXIT_S}s after the server was killed")
    assert time.monotonic() - killed_s < LOST_RANK_EXIT_S
    assert wait_group_empty(server) == []


def test_three_shards_of_four_heads_fail_at_start(model_dir, tmp_path):
    log_path = tmp_path / "server.log"
    server = ServerProcess(model_dir, log_path, *TEST_SERVER_FLAGS, *shard_flags(3))
    try:
        assert server.process.wait(timeout=180) == 1
    finally:
        server.kill()
    log = server.log()
    assert "cannot shard this model over 3 ranks" in log and "shard counts that work: 1, 2, 4" in log
    assert wait_group_empty(server) == []
