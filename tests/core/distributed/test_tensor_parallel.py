"""TensorParallel's start-up gather (`gather_text`) over real gloo ranks: rank 0 receives every rank's
line in rank order (None where a rank had nothing to say), the others None; a line longer than the
buffer arrives cut, not garbled, and non-ASCII text survives."""
from __future__ import annotations

import json
import multiprocessing
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tgserve.core.distributed.tensor_parallel import TEXT_BYTES, TensorParallel

from .test_sharded_model import free_port

WORLD_SIZE = 3
TEXTS = [None, "rank 1: 2 quantized layers dequantized, 0.2 MiB: model.layers.*.mlp.down_proj x2", "é" * TEXT_BYTES]


def rank_main(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=60))
    try:
        gathered = TensorParallel.from_group().gather_text(TEXTS[rank], torch.device("cpu"))
        (Path(out_dir) / f"rank-{rank}.json").write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_rank_0_gathers_every_ranks_line_in_order(tmp_path):
    context, port = multiprocessing.get_context("spawn"), free_port()
    ranks = [context.Process(target=rank_main, args=(rank, port, str(tmp_path))) for rank in range(WORLD_SIZE)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
        if process.is_alive():
            process.kill()
            process.join(timeout=10)
    assert [process.exitcode for process in ranks] == [0] * WORLD_SIZE
    results = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert results[1] is None and results[2] is None
    assert results[0][:2] == TEXTS[:2]
    assert results[0][2] == "é" * (TEXT_BYTES // 2)  # 2 bytes each: cut at the buffer, on a whole character


def test_one_rank_gets_its_own_text_back_without_a_process_group():
    assert TensorParallel.single().gather_text("hello", torch.device("cpu")) == ["hello"]
