"""`tgserve serve` start-up on CPU: a probe instead of a full warmup step, the prefill limit derived
from the measured speed, a KV cache whose pages stay untouched until used, and TGI's message when a
limit cannot fit."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tgserve.backends.cpu import host, plugin
from tgserve.benchmark.startup import parse_server_log, read_status_mib
from tgserve.core.limits_derivation import DEFAULT_MAX_BATCH_PREFILL_TOKENS, MIN_DERIVED_PREFILL_TOKENS, WIGGLE_ROOM

from .conftest import ServerProcess

KV_CACHE_GIB = 1.5
# A demo-model server holds ~350 MiB resident; zero-filling the 1.5 GiB cache (the old start-up)
# held more than 1.8 GiB. Half-way between, so neither allocator noise nor a few requests can pass it.
MAX_RSS_MIB = 1024


def test_a_prefill_limit_that_cannot_fit_fails_at_start_with_tgis_message(run_cli, model_dir):
    tokens = 10**8  # its analytic peak (the attention mask alone: 1e8 x 4096 keys) fits no machine's memory
    result = run_cli("serve", "--model-id", str(model_dir), "--max-batch-prefill-tokens", str(tokens))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0] == (f"tgserve: error: Not enough memory to handle {tokens} prefill tokens. "
                        "You need to decrease `--max-batch-prefill-tokens`")


@pytest.fixture(scope="module")
def big_cache_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A demo-model server with every limit derived and a 1.5 GiB float32 KV cache."""
    if host.available_memory_bytes() * plugin.MEMORY_SHARE * WIGGLE_ROOM < (KV_CACHE_GIB + 0.5) * 2**30:
        pytest.skip(f"needs {(KV_CACHE_GIB + 0.5) / plugin.MEMORY_SHARE / WIGGLE_ROOM:.1f} GiB of available RAM")
    server = ServerProcess(model_dir, tmp_path_factory.mktemp("startup") / "server.log", "--dtype", "float32",
                           "--kv-cache-gib", str(KV_CACHE_GIB), "--max-concurrent-requests", "4096")
    try:
        yield server.wait_healthy()
    finally:
        server.terminate()


def test_the_prefill_limit_comes_from_the_probe_and_is_logged_once(big_cache_server):
    found = parse_server_log(big_cache_server.log())
    assert found["probe_tokens_per_s"] > 0 and found["warmup_s"] > 0
    assert MIN_DERIVED_PREFILL_TOKENS <= found["max_batch_prefill_tokens"] <= DEFAULT_MAX_BATCH_PREFILL_TOKENS
    assert big_cache_server.log().count("Warmup:") == 1
    assert "measured prefill speed" in big_cache_server.log()


def test_kv_cache_pages_stay_untouched_until_requests_use_them(big_cache_server):
    assert parse_server_log(big_cache_server.log())["kv_cache_mib"] >= KV_CACHE_GIB * 1024 - 1
    assert read_status_mib(big_cache_server.process.pid)["VmRSS"] < MAX_RSS_MIB
    with httpx.Client(base_url=big_cache_server.url, timeout=120) as client:
        for prompt in ("Once upon a time", "The river ran " * 100):
            response = client.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 50}})
            assert response.status_code == 200, response.text
    assert read_status_mib(big_cache_server.process.pid)["VmRSS"] < MAX_RSS_MIB
