"""The server's configuration: one frozen dataclass whose fields carry TGI's launcher flag names.

Values the user did not set stay None here; what start-up derives from the model and the memory
(KV blocks, the token limits TGI infers) lives in `tgserve.core.limits.RuntimeLimits`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

DTYPES = ("float16", "bfloat16", "float32")
# TGI's --quantize names (its `Quantization` enum), and those tgserve implements so far.
TGI_QUANTIZE_METHODS = ("awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin", "bitsandbytes",
                        "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8")
QUANTIZE_METHODS = ("awq", "bitsandbytes-nf4", "compressed-tensors", "eetq", "fp8", "gptq")
ROPE_SCALINGS = ("linear", "dynamic")  # what TGI's --rope-scaling accepts
# Most tokens --speculate may propose per step: each one is a verified row of every decoding sequence,
# and past a few dozen an n-gram guess is almost never right; the bound keeps a typo from planning
# steps of thousands of rows.
MAX_SPECULATE = 64
# --speculate when --speculative-model is given without it: draft proposals per step (vLLM's examples use 4-5).
DEFAULT_DRAFT_SPECULATE = 4
DEFAULT_MASTER_PORT = 29500  # TGI's --master-port: torch.distributed's rendezvous of the shards


class ConfigError(ValueError):
    """A flag value, or a combination of them, that cannot work. The message names the flag."""


@dataclass(slots=True, frozen=True)
class ServerConfig:
    """Every launcher flag, with TGI's names and defaults (TGI-CONTRACT section 1)."""

    model_id: str | None = None  # hub id or local directory; None serves SmolLM2-135M-Instruct (checkpoints/smollm2.py)
    revision: str | None = None
    dtype: str | None = None  # float16 | bfloat16 | float32; None: the backend's default
    quantize: str | None = None  # --quantize: one of QUANTIZE_METHODS; None: unquantized
    backend: str = "auto"  # a backend plugin's name, or auto
    hostname: str = "0.0.0.0"
    port: int = 3000
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_batch_size: int | None = None
    max_client_batch_size: int = 4
    enable_prefill_logprobs: bool = False
    json_output: bool = False
    huggingface_hub_cache: str | None = None
    trust_remote_code: bool = False
    rope_scaling: str | None = None  # linear | dynamic: replaces the checkpoint's rope scaling (TGI's semantics)
    rope_factor: float | None = None  # its factor; given alone it means linear (see core/rope_scaling.py)
    payload_limit: int = 2_000_000
    graceful_termination_timeout: int = 90  # seconds SIGTERM waits for in-flight requests
    cuda_memory_fraction: float = 1.0  # share of the memory the backend reports that tgserve may use
    kv_cache_gib: float | None = None  # KV-cache budget in GiB; None: the backend's default (cpu: 4)
    # --speculate: tokens proposed per step and verified in the same forward (n-gram proposals from the
    # request's own tokens, `tgserve.core.speculation`); None or 0: one token per step, as TGI.
    speculate: int | None = None
    # --speculative-model: a smaller checkpoint with the same vocabulary whose guesses are verified
    # (`tgserve.core.speculation.draft`); --speculate then defaults to DEFAULT_DRAFT_SPECULATE.
    speculative_model: str | None = None
    watermark_gamma: float = 0.5  # share of the vocabulary on each greenlist (Kirchenbauer et al.)
    watermark_delta: float = 2.0  # logit bias added to greenlist tokens
    prometheus_port: int = 9000  # second listener serving only /metrics; 0: none
    api_key: str | None = field(default=None, repr=False)  # bearer token of the generation routes
    cors_allow_origin: tuple[str, ...] = ()  # origins browsers may call from; empty: any origin
    otlp_endpoint: str | None = None  # OpenTelemetry collector (OTLP/gRPC) receiving one span per request
    otlp_service_name: str = "text-generation-inference.router"  # service.name of those spans
    # --num-shard: tensor-parallel ranks sharing the model (`tgserve.core.distributed`); None: settled at
    # start by `find_num_shards` from --sharded and the backend's device count, as TGI's launcher.
    num_shard: int | None = None
    sharded: bool | None = None  # --sharded true|false; false keeps the model on one rank
    master_addr: str = "localhost"  # rank 0's address for the ranks' rendezvous (MASTER_ADDR)
    master_port: int = DEFAULT_MASTER_PORT  # its port (MASTER_PORT)
    # --nnodes / --node-rank (torchrun's names): machines sharing the --num-shard ranks, each running
    # `tgserve serve` with the same flags and its own node rank; node 0 serves HTTP (`distributed.launch`).
    nnodes: int = 1
    node_rank: int = 0
    # --disable-grammar-support: requests with a grammar (TGI's `grammar`, OpenAI's `response_format` /
    # `tools`) get TGI's 422 "grammar is not supported"; no grammar tokenizer is built at start.
    disable_grammar_support: bool = False
    # --grammar-compile-timeout: seconds one grammar may take to compile (off the engine thread) before its
    # requests get a 422; valid grammars compile in milliseconds (`tgserve.core.grammar.compiler`).
    grammar_compile_timeout: float = 5.0
    # --prefix-caching / PREFIX_CACHING (TGI's variable): reuse the K/V of full blocks a new request's prompt
    # shares with an earlier one (`tgserve.core.block_manager`); false computes every prompt whole.
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE_METHODS:
            known = "TGI's" if self.quantize in TGI_QUANTIZE_METHODS else "a"
            raise ConfigError(f"`--quantize {self.quantize}` is {known} method tgserve does not implement; "
                              f"supported: {', '.join(QUANTIZE_METHODS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"`--dtype` must be one of {', '.join(DTYPES)}. Given: {self.dtype}")
        for name in ("max_concurrent_requests", "max_batch_size", "max_input_tokens", "max_total_tokens",
                     "max_batch_prefill_tokens", "max_batch_total_tokens", "max_client_batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"`{name}` must be > 0. Given: {value}")
        if self.rope_scaling is not None and self.rope_scaling not in ROPE_SCALINGS:
            raise ConfigError(f"`--rope-scaling` must be one of {', '.join(ROPE_SCALINGS)}. Given: {self.rope_scaling}")
        if self.rope_factor is not None and not (math.isfinite(self.rope_factor) and self.rope_factor >= 1.0):
            raise ConfigError("`--rope-factor` must be a number >= 1.0, the times the trained context is stretched. "
                              f"Given: {self.rope_factor}")
        if self.speculate is not None and not 0 <= self.speculate <= MAX_SPECULATE:
            raise ConfigError(f"`speculate` must be in [0, {MAX_SPECULATE}]. Given: {self.speculate}")
        if self.speculative_model is not None:
            if self.speculate == 0:
                raise ConfigError("`--speculative-model` needs `--speculate` >= 1 (the draft's proposals per step). "
                                  "Given: 0")
            if self.speculate is None:  # the flag's documented default, settled while constructing
                object.__setattr__(self, "speculate", DEFAULT_DRAFT_SPECULATE)
        if not 0 <= self.prometheus_port <= 65535:
            raise ConfigError(f"`prometheus_port` must be in [0, 65535]. Given: {self.prometheus_port}")
        if not 0.0 < self.watermark_gamma < 1.0:
            raise ConfigError(f"`watermark_gamma` must be in (0, 1). Given: {self.watermark_gamma}")
        if not 0.0 < self.cuda_memory_fraction <= 1.0:
            raise ConfigError(f"`cuda_memory_fraction` must be in (0, 1]. Given: {self.cuda_memory_fraction}")
        if not self.grammar_compile_timeout > 0:
            raise ConfigError(f"`grammar_compile_timeout` must be > 0. Given: {self.grammar_compile_timeout}")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ConfigError(f"`kv_cache_gib` must be > 0. Given: {self.kv_cache_gib}")
        if not 1 <= self.master_port <= 65535:
            raise ConfigError(f"`master_port` must be in [1, 65535]. Given: {self.master_port}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"`--node-rank` must be in [0, --nnodes) and `--nnodes` >= 1. Given: "
                              f"--nnodes {self.nnodes} --node-rank {self.node_rank}")
        if self.num_shard is not None or self.sharded is not None:
            find_num_shards(self.sharded, self.num_shard, device_count=2)  # the flags' own consistency
        if self.speculative_model is not None and (self.num_shard or 1) > 1:
            raise ConfigError("`--num-shard` does not combine with `--speculative-model` yet: the draft model "
                              "runs on rank 0 alone; use n-gram speculation (`--speculate N`) when sharded")
        check_token_limits(self.max_input_tokens, self.max_total_tokens,
                           self.max_batch_prefill_tokens, self.max_batch_total_tokens)


def find_num_shards(sharded: bool | None, num_shard: int | None, device_count: int) -> int:
    """The shard count, as TGI's launcher settles it: --num-shard when given; --sharded true alone: one
    per device (`device_count`, the backend's answer), which must be more than one; neither: the
    device count. Raises ConfigError with TGI's messages (and for --sharded false with --num-shard > 1,
    which TGI documents as switching sharding off: a contradiction is refused rather than guessed)."""
    if num_shard is not None and num_shard < 1:
        raise ConfigError("`num_shard` cannot be < 1")
    if sharded is True and num_shard is None:
        if device_count <= 1:
            raise ConfigError(f"`sharded` is true but only found {device_count} device(s); "
                              "give the shard count with `--num-shard N`")
        return device_count
    if sharded is True and num_shard <= 1:
        raise ConfigError("`sharded` is true but `num_shard` <= 1")
    if sharded is False:
        if num_shard is not None and num_shard > 1:
            raise ConfigError(f"`sharded` is false but `num_shard` is {num_shard}: drop `--sharded false` "
                              "to shard, or `--num-shard` to serve on one rank")
        return 1
    return num_shard if num_shard is not None else device_count


def check_token_limits(max_input: int | None, max_total: int | None,
                       max_prefill: int | None, max_batch_total: int | None) -> None:
    """TGI's start-up consistency checks, with its messages, on whichever limits are known."""
    if max_input is not None and max_total is not None and max_input >= max_total:
        raise ConfigError(f"`max_input_tokens`({max_input}) must be < `max_total_tokens`({max_total})")
    if max_total is not None and max_batch_total is not None and max_total > max_batch_total:
        raise ConfigError("`max_total_tokens` must be <= `max_batch_total_tokens`")
    if max_prefill is not None and max_batch_total is not None and max_prefill > max_batch_total:
        raise ConfigError("`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`")


