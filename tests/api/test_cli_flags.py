"""`tgserve serve` flags: TGI's names and defaults, the environment, and the command line winning."""
from __future__ import annotations

import pytest

from tgserve.api.cli import build_parser
from tgserve.api.cli_flags import config_from_args
from tgserve.core.config import ConfigError, ServerConfig


def config(argv: list[str], environ: dict[str, str] | None = None) -> ServerConfig:
    args = build_parser().parse_args(["serve", *argv])
    return config_from_args(args, environ or {})


def test_tgi_defaults():
    assert config([]) == ServerConfig()
    defaults = ServerConfig()
    assert (defaults.hostname, defaults.port, defaults.max_concurrent_requests) == ("0.0.0.0", 3000, 128)
    assert (defaults.max_best_of, defaults.max_stop_sequences, defaults.max_top_n_tokens) == (2, 4, 5)
    assert (defaults.max_client_batch_size, defaults.payload_limit) == (4, 2_000_000)
    assert defaults.graceful_termination_timeout == 90 and defaults.cuda_memory_fraction == 1.0


def test_every_flag_maps_to_its_field():
    argv = ["--model-id", "org/m", "--revision", "refs/pr/2", "--dtype", "bfloat16", "--backend", "cpu",
            "--hostname", "127.0.0.1", "-p", "8080", "--max-concurrent-requests", "7", "--max-best-of", "1",
            "--max-stop-sequences", "3", "--max-top-n-tokens", "2", "--max-input-tokens", "100",
            "--max-total-tokens", "200", "--max-batch-prefill-tokens", "300", "--max-batch-total-tokens", "400",
            "--max-batch-size", "8", "--max-client-batch-size", "9", "--enable-prefill-logprobs", "--json-output",
            "--huggingface-hub-cache", "/hub", "--trust-remote-code", "--payload-limit", "1000", "-g", "5",
            "--cuda-memory-fraction", "0.5"]
    assert config(argv) == ServerConfig(
        model_id="org/m", revision="refs/pr/2", dtype="bfloat16", backend="cpu", hostname="127.0.0.1", port=8080,
        max_concurrent_requests=7, max_best_of=1, max_stop_sequences=3, max_top_n_tokens=2, max_input_tokens=100,
        max_total_tokens=200, max_batch_prefill_tokens=300, max_batch_total_tokens=400, max_batch_size=8,
        max_client_batch_size=9, enable_prefill_logprobs=True, json_output=True, huggingface_hub_cache="/hub",
        trust_remote_code=True, payload_limit=1000, graceful_termination_timeout=5, cuda_memory_fraction=0.5)


def test_environment_and_precedence():
    environ = {"MODEL_ID": "env/model", "PORT": "80", "MAX_INPUT_TOKENS": "10", "JSON_OUTPUT": "true",
               "HOSTNAME": "", "CUDA_MEMORY_FRACTION": "0.25"}
    from_env = config([], environ)
    assert (from_env.model_id, from_env.port, from_env.max_input_tokens) == ("env/model", 80, 10)
    assert from_env.json_output is True and from_env.cuda_memory_fraction == 0.25
    assert from_env.hostname == "0.0.0.0"  # an empty variable counts as unset
    overridden = config(["--port", "3001", "--model-id", "cli/model"], environ)
    assert (overridden.model_id, overridden.port) == ("cli/model", 3001)
    assert config([], {"TRUST_REMOTE_CODE": "0"}).trust_remote_code is False


def test_legacy_max_input_length():
    assert config(["--max-input-length", "12"]).max_input_tokens == 12
    assert config([], {"MAX_INPUT_LENGTH": "13"}).max_input_tokens == 13
    with pytest.raises(ConfigError, match=r"^Both `max_input_tokens` \(5\) and `max_input_length` \(6\) are set"):
        config(["--max-input-tokens", "5", "--max-input-length", "6"])
    with pytest.raises(ConfigError, match="Both"):
        config(["--max-input-length", "6"], {"MAX_INPUT_TOKENS": "5"})


@pytest.mark.parametrize("environ, message", [
    ({"PORT": "http"}, "PORT='http' is not a valid int"),
    ({"JSON_OUTPUT": "maybe"}, "JSON_OUTPUT='maybe' is not a boolean"),
    ({"DTYPE": "int8"}, "DTYPE='int8' must be one of float16, bfloat16, float32"),
])
def test_bad_environment_values(environ, message):
    with pytest.raises(ConfigError, match=message):
        config([], environ)


def test_config_checks_run_on_the_merged_values():
    with pytest.raises(ConfigError, match=r"`max_input_tokens`\(10\) must be < `max_total_tokens`\(10\)"):
        config(["--max-input-tokens", "10"], {"MAX_TOTAL_TOKENS": "10"})


def test_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--port", "abc"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'abc'" in err


def test_rope_flags_and_their_environment():
    assert config(["--rope-scaling", "dynamic", "--rope-factor", "2"]) == ServerConfig(rope_scaling="dynamic",
                                                                                       rope_factor=2.0)
    from_env = config([], {"ROPE_SCALING": "linear", "ROPE_FACTOR": "4.0"})
    assert (from_env.rope_scaling, from_env.rope_factor) == ("linear", 4.0)
    assert config(["--rope-factor", "3"], {"ROPE_FACTOR": "4.0"}).rope_factor == 3.0
    with pytest.raises(ConfigError, match="ROPE_SCALING='yarn' must be one of linear, dynamic"):
        config([], {"ROPE_SCALING": "yarn"})
    with pytest.raises(ConfigError, match="ROPE_FACTOR='four' is not a valid float"):
        config([], {"ROPE_FACTOR": "four"})
    with pytest.raises(ConfigError, match=r"`--rope-factor` must be a number >= 1.0.*Given: 0.5"):
        config(["--rope-factor", "0.5"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--rope-scaling", "yarn"])


def test_speculate_flag_and_environment():
    assert config([]).speculate is None
    assert config(["--speculate", "2"]).speculate == 2
    assert config([], {"SPECULATE": "4"}).speculate == 4
    assert config(["--speculate", "0"], {"SPECULATE": "4"}).speculate == 0
    with pytest.raises(ConfigError, match=r"`speculate` must be in \[0, 64\]. Given: -1"):
        config(["--speculate", "-1"])
    with pytest.raises(ConfigError, match="SPECULATE='two' is not a valid int"):
        config([], {"SPECULATE": "two"})


def test_shard_flags_and_their_environment():
    assert config(["--num-shard", "2", "--master-addr", "10.0.0.1", "--master-port", "29600"]) == ServerConfig(
        num_shard=2, master_addr="10.0.0.1", master_port=29600)
    defaults = config([])
    assert (defaults.num_shard, defaults.sharded, defaults.master_addr, defaults.master_port) == (
        None, None, "localhost", 29500)
    from_env = config([], {"NUM_SHARD": "4", "SHARDED": "true", "MASTER_ADDR": "node0", "MASTER_PORT": "1234"})
    assert (from_env.num_shard, from_env.sharded) == (4, True)
    assert (from_env.master_addr, from_env.master_port) == ("node0", 1234)
    assert config(["--sharded", "false"]).sharded is False
    nodes = config(["--num-shard", "4", "--nnodes", "2"], {"NODE_RANK": "1"})
    assert (nodes.nnodes, nodes.node_rank, defaults.nnodes, defaults.node_rank) == (2, 1, 1, 0)
    assert config(["--num-shard", "1"], {"NUM_SHARD": "4"}).num_shard == 1
    with pytest.raises(ConfigError, match="SHARDED='maybe' is not a valid boolean"):
        config([], {"SHARDED": "maybe"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--sharded", "maybe"])


@pytest.mark.parametrize("argv, message", [
    (["--sharded", "false", "--num-shard", "2"], "`sharded` is false but `num_shard` is 2"),
    (["--sharded", "true", "--num-shard", "1"], r"`sharded` is true but `num_shard` <= 1"),
    (["--num-shard", "0"], r"`num_shard` cannot be < 1"),
    (["--master-port", "70000"], r"`master_port` must be in \[1, 65535\]"),
    (["--nnodes", "2", "--node-rank", "2"], r"`--node-rank` must be in \[0, --nnodes\)"),
    (["--nnodes", "0"], r"`--nnodes` >= 1"),
    (["--num-shard", "2", "--speculative-model", "draft"], "`--num-shard` does not combine with `--speculative-model`"),
])
def test_shard_flag_contradictions(argv, message):
    with pytest.raises(ConfigError, match=message):
        config(argv)


def test_find_num_shards_as_tgi_launcher():
    from tgserve.core.config import find_num_shards
    assert find_num_shards(None, None, device_count=1) == 1  # neither flag: one rank per device
    assert find_num_shards(None, None, device_count=4) == 4
    assert find_num_shards(True, None, device_count=4) == 4
    assert find_num_shards(None, 2, device_count=1) == 2  # --num-shard needs no devices (cpu ranks share the host)
    assert find_num_shards(False, None, device_count=4) == 1
    assert find_num_shards(False, 1, device_count=4) == 1
    with pytest.raises(ConfigError, match="`sharded` is true but only found 1 device"):
        find_num_shards(True, None, device_count=1)
