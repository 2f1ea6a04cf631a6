"""`tgserve benchmark serve` from parsed flags to printed tables, the JSON file and the plot."""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from tgserve.benchmark.arrivals import format_rate, parse_request_rates
from tgserve.benchmark.conversations import Conversation, multiturn_dataset
from tgserve.benchmark.datasets import SampleRequest, load_tokenizer, random_dataset, sharegpt_dataset
from tgserve.benchmark.metrics_serve import parse_goodput
from tgserve.benchmark.serve import RateResult, ServeBenchConfig, run_sweep
from tgserve.benchmark.serve_report import format_result_table, format_sweep_table, write_result_file


def build_dataset(args: argparse.Namespace) -> list[SampleRequest] | list[Conversation]:
    """The prompts (or conversations) the flags describe (ValueError for a bad combination)."""
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    if args.prefix_len < 0:
        raise ValueError("--prefix-len must be >= 0")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset sharegpt needs --dataset-path FILE.json")
        samples = sharegpt_dataset(args.dataset_path, args.num_prompts, args.seed, tokenizer, args.sharegpt_output_len)
        if len(samples) < args.num_prompts:
            print(f"note: {args.dataset_path} has only {len(samples)} usable conversations", file=sys.stderr)
        return samples
    if args.dataset == "multiturn":
        return multiturn_dataset(args.num_prompts, args.num_turns, args.prefix_len, args.input_len, args.output_len,
                                 args.range_ratio, args.seed, tokenizer)
    return random_dataset(args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.prefix_len,
                          args.seed, tokenizer)


def build_config(args: argparse.Namespace) -> ServeBenchConfig:
    """The load to apply (ValueError for bad rates, SLOs or limits)."""
    slos_ms = parse_goodput(args.goodput) if args.goodput else {}
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer and args.dataset == "multiturn" else None
    return ServeBenchConfig(
        backend=args.backend, base_url=args.base_url, model=args.model,
        request_rates=tuple(parse_request_rates(args.request_rate)), burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, seed=args.seed, force_output_len=args.force_output_len,
        goodput_slos_ms=tuple(slos_ms.items()), is_progress_shown=not args.disable_tqdm, tokenizer=tokenizer)


def config_json(args: argparse.Namespace, config: ServeBenchConfig, num_prompts: int) -> dict[str, Any]:
    """The run's settings as recorded in the result file."""
    return {"backend": config.backend, "base_url": config.base_url, "model": config.model,
            "dataset": args.dataset, "dataset_path": args.dataset_path, "tokenizer": args.tokenizer,
            "num_prompts": num_prompts, "input_len": args.input_len, "output_len": args.output_len,
            "range_ratio": args.range_ratio, "prefix_len": args.prefix_len,
            "num_turns": args.num_turns if args.dataset == "multiturn" else None,
            "request_rates": [format_rate(rate) for rate in config.request_rates], "burstiness": config.burstiness,
            "max_concurrency": config.max_concurrency, "force_output_len": config.force_output_len,
            "goodput_slos_ms": dict(config.goodput_slos_ms), "seed": config.seed}


def run_serve(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe; 0 if any request completed at every rate, else 1."""
    config = build_config(args)
    samples = build_dataset(args)
    what = "conversations" if args.dataset == "multiturn" else "prompts"
    print(f"benchmark serve: {len(samples)} {what}, {config.backend} at {config.base_url}, "
          f"rates {', '.join(format_rate(rate) for rate in config.request_rates)}", flush=True)

    def on_result(result: RateResult) -> None:
        print(format_result_table(result, config.max_concurrency), flush=True)

    config, results = asyncio.run(run_sweep(config, samples, on_result))
    if len(results) > 1:
        print(format_sweep_table(results), flush=True)
    if args.result_file:
        write_result_file(args.result_file, config_json(args, config, len(samples)), results)
        print(f"results: {args.result_file}")
    if args.plot_file:
        from tgserve.benchmark.plot import plot_sweep

        plot_sweep(results, args.plot_file, title=f"{config.backend} {config.base_url}")
        print(f"plot: {args.plot_file}")
    return 0 if all(result.metrics.num_completed > 0 for result in results) else 1
