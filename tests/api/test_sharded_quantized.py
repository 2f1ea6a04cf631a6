"""`tgserve serve --num-shard 2` on quantized weights, through HTTP: int8 quantized at load (`--quantize
eetq` on the float demo checkpoint), a GPTQ 4-bit checkpoint in group order, and a GPTQ act-order one
(desc_act, g_idx scattering every group's inputs over the whole layer, so each row-parallel rank holds
parts of every group: o_proj and down_proj exercise `core/quantization/act_order`).

Oracle: the same checkpoint and flags on one shard. A GPTQ checkpoint's weights are the same values
however they split, so sharding changes only float32 summation order: greedy ids identical, logprobs
within float32 rounding. eetq quantizes at load whatever each rank holds, as TGI's eetq does: a
row-parallel rank's per-channel int8 scale comes from its half of each row, a little finer than one
shard's, so logprobs move by a few thousandths (greedy ids still agree on these prompts). The servers
start together (their loading overlaps) and each is asked two prompts at once. A group-order GPTQ checkpoint whose row-parallel slices would cut its groups fails at start.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.core.quantization.gptq_writer import gptq_quantize, quantization_config

from .conftest import TEST_SERVER_FLAGS, ServerProcess, free_port
from .quantized_oracle import write_quantized_copy

PROMPTS = ("Once upon a time", "The river ran past the mill. The river ran")
NEW_TOKENS = 12
LOGPROB_TOLERANCE = {"eetq": 2e-2, "gptq": 1e-3, "gptq-act-order": 1e-3}  # measured: eetq 0.006 apart
# Modules reading one input share one act-order input order (GPTQ's shared Hessian gives them one).
_INPUT_OF = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}
# The demo's down_proj has 352 inputs: 176 per rank at 2 shards, whole groups of 16 but not of 32.
IN_ORDER_GROUP, ACT_ORDER_GROUP = 16, 32


def write_gptq(model_dir: Path, out_dir: Path, group_size: int, act_order: bool) -> Path:
    """The demo checkpoint's linear layers (lm_head kept float) as 4-bit GPTQ (v1 zero points)."""
    def quantize(module_name: str, weight):
        module = module_name.rsplit(".", 1)[-1]
        if module == "lm_head":
            return None
        return gptq_quantize(weight, 4, group_size, sym=False, act_order=act_order,
                             seed=10 * int(module_name.split(".")[2]) + _INPUT_OF[module])

    path, _ = write_quantized_copy(model_dir, out_dir, quantize, "quantization_config",
                                   quantization_config(4, group_size, sym=False, desc_act=act_order))
    return path


def start(checkpoint: Path, log_dir: Path, num_shard: int, *flags: str) -> ServerProcess:
    """A server process (not yet healthy) of `checkpoint` on `num_shard` ranks."""
    return ServerProcess(checkpoint, log_dir / f"{checkpoint.name}-{num_shard}.log", *TEST_SERVER_FLAGS, *flags,
                         "--num-shard", str(num_shard), "--master-port", str(free_port()), "--prometheus-port", "0")


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """{kind: (one shard, two shards)}, all healthy; stopped at teardown."""
    root = tmp_path_factory.mktemp("sharded-quantized")
    checkpoints = {"eetq": (model_dir, ("--quantize", "eetq")),
                   "gptq": (write_gptq(model_dir, root / "gptq", IN_ORDER_GROUP, False), ()),
                   "gptq-act-order": (write_gptq(model_dir, root / "gptq-act-order", ACT_ORDER_GROUP, True), ())}
    started = {kind: tuple(start(path, root, n, *flags) for n in (1, 2)) for kind, (path, flags) in checkpoints.items()}
    try:
        for pair in started.values():
            for server in pair:
                server.wait_healthy()
        yield started
    finally:
        for pair in started.values():
            for server in pair:
                server.terminate()


def generate(url: str, prompt: str) -> dict:
    response = httpx.post(f"{url}/generate", json={"inputs": prompt, "parameters": {
        "max_new_tokens": NEW_TOKENS, "details": True}}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["details"]


def generate_all(url: str) -> list[dict]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(generate, [url] * len(PROMPTS), PROMPTS))


@pytest.mark.parametrize("kind", ["eetq", "gptq", "gptq-act-order"])
def test_two_shards_serve_one_shards_greedy_ids(kind, servers):
    one, two = servers[kind]
    info = httpx.get(f"{two.url}/info", timeout=10).json()
    assert info["num_shard"] == 2 and info["quantization"]["method"] == kind.split("-")[0]
    for got, want in zip(generate_all(two.url), generate_all(one.url)):
        assert [t["id"] for t in got["tokens"]] == [t["id"] for t in want["tokens"]]
        assert [t["logprob"] for t in got["tokens"]] == pytest.approx([t["logprob"] for t in want["tokens"]],
                                                                      abs=LOGPROB_TOLERANCE[kind])


def test_groups_cut_by_the_row_split_fail_at_start(model_dir, tmp_path):
    """Group order, groups of 32: down_proj's 176 inputs per rank would cut a group in two."""
    server = start(write_gptq(model_dir, tmp_path / "gptq32", 32, False), tmp_path, 2)
    try:
        assert server.process.wait(timeout=180) == 1
    finally:
        server.kill()
    last = server.log().strip().splitlines()[-1]
    assert last.startswith("tgserve: error:") and "rank's 176 input features are not a multiple of 32" in last, last
    assert "`--num-shard`" in last
