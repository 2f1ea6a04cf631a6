"""`tgserve serve --num-shard 2` on quantized weights, through HTTP: int8 quantized at load (`--quantize
eetq` on the float demo checkpoint), a GPTQ 4-bit checkpoint in group order, a GPTQ act-order one
(desc_act, g_idx scattering every group's inputs over the whole layer, so each row-parallel rank holds
parts of every group: o_proj and down_proj exercise `core/quantization/act_order`), and llm-compressor's
compressed-tensors pack-quantized 4-bit checkpoint with zero points (tests/fixtures/llmcompressor, the
demo model quantized by llm-compressor itself): weight_shape states each whole module, and its zero
points pack 8 outputs per word, which column-parallel ranks slice in whole words.

Every grouped checkpoint here uses groups of 32, and the demo's down_proj has 352 inputs: 176 per rank
at 2 shards, so the split cuts group 5 in two. Every rank then holds the whole scales; rank 0's inputs
still end on whole groups (the last one short) and keep the grouped kernel, rank 1's do not and its
down_proj is dequantized at load, which its start-up log line names with the memory it takes.

Oracle: the same checkpoint and flags on one shard. A pre-quantized checkpoint's weights are the same
values however they split, so sharding changes only float32 summation order: greedy ids identical,
logprobs within float32 rounding. eetq quantizes at load whatever each rank holds, as TGI's eetq does:
a row-parallel rank's per-channel int8 scale comes from its half of each row, a little finer than one
shard's, so logprobs move by a few thousandths (greedy ids still agree on these prompts). The servers
start together (their loading overlaps) and each is asked two prompts at once.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.core.quantization.gptq_writer import gptq_quantize, quantization_config

from .conftest import TEST_SERVER_FLAGS, ServerProcess, free_port
from .quantized_oracle import write_quantized_copy
from .test_third_party_checkpoints import FIXTURES, assemble

PROMPTS = ("Once upon a time", "The river ran past the mill. The river ran")
NEW_TOKENS = 12
KINDS = {"eetq": "eetq", "gptq": "gptq", "gptq-act-order": "gptq", "llmc-w4-g32-asym": "compressed-tensors"}
# measured: eetq 0.006 apart
LOGPROB_TOLERANCE = {"eetq": 2e-2, "gptq": 1e-3, "gptq-act-order": 1e-3, "llmc-w4-g32-asym": 1e-3}
# Modules reading one input share one act-order input order (GPTQ's shared Hessian gives them one).
_INPUT_OF = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}
GROUP = 32  # cuts a group of down_proj's at 2 shards (176 inputs per rank)
# rank 1's float32 down_proj [128, 176] in each of the demo's 2 layers: 2 * 90112 bytes
CUT_GROUPS_LINE = ("rank 1: 2 quantized layers dequantized to float32 at load, 0.2 MiB: "
                   "model.layers.*.mlp.down_proj x2 (")


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
                   "gptq": (write_gptq(model_dir, root / "gptq", GROUP, False), ()),
                   "gptq-act-order": (write_gptq(model_dir, root / "gptq-act-order", GROUP, True), ()),
                   "llmc-w4-g32-asym": (assemble(model_dir, FIXTURES / "llmcompressor/w4-g32-asym",
                                                 root / "llmc-w4-g32-asym"), ())}
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


@pytest.mark.parametrize("kind", list(KINDS))
def test_two_shards_serve_one_shards_greedy_ids(kind, servers):
    one, two = servers[kind]
    info = httpx.get(f"{two.url}/info", timeout=10).json()
    assert info["num_shard"] == 2 and info["quantization"]["method"] == KINDS[kind]
    for got, want in zip(generate_all(two.url), generate_all(one.url)):
        assert [t["id"] for t in got["tokens"]] == [t["id"] for t in want["tokens"]]
        assert [t["logprob"] for t in got["tokens"]] == pytest.approx([t["logprob"] for t in want["tokens"]],
                                                                      abs=LOGPROB_TOLERANCE[kind])


@pytest.mark.parametrize("kind", ["gptq", "llmc-w4-g32-asym"])
def test_the_start_up_log_names_the_layers_dequantized_where_the_split_cuts_groups(kind, servers):
    """Group order: only rank 1's down_proj starts mid-group; one shard keeps every layer's codes."""
    one, two = servers[kind]
    log = two.log()
    assert CUT_GROUPS_LINE in log, log[-4000:]
    assert log.count("dequantized to float32 at load") == 1  # rank 0 says nothing
    assert "dequantized to float32 at load" not in one.log()
