"""The memory-bandwidth floor of a decode step: bytes it must read / bytes per second the device streams.

A decode step reads every weight once (the linears, the norms and the lm_head), the embedding rows
of its tokens and the K/V of every cached token of every sequence. With the bandwidth measured on
the same device in the same run, `bytes / bandwidth` is the fastest that step could ever be; a
measured step is reported as `floor_ms / measured_ms` (1.0 = at the roofline).

About a tied lm_head: tgserve keeps a packed copy of the embedding table as the lm_head, so the
table is resident twice (`resident_weight_bytes`), but a step reads the packed copy whole and only
`num_tokens` rows of the embedding table; the bytes read per step equal the checkpoint's bytes.
For an untied checkpoint the embedding table is gathered, not streamed, so the step reads less
than the checkpoint holds. Everything here is pure arithmetic except `measure_read_bandwidth`.
"""
from __future__ import annotations

import json
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

EMBEDDING_SUFFIX = "embed_tokens.weight"
LM_HEAD_NAME = "lm_head.weight"


@dataclass(slots=True, frozen=True)
class WeightBytes:
    """Weight bytes of one checkpoint at the run dtype (not the stored dtype)."""

    checkpoint_bytes: int  # every tensor of the safetensors files, numel * run itemsize
    embedding_bytes: int  # the input embedding table
    lm_head_bytes: int  # the output projection (= embedding_bytes when tied)
    is_tied: bool  # no lm_head.weight in the checkpoint: the head is the embedding table
    resident_weight_bytes: int  # what tgserve holds: the checkpoint plus a packed head copy when tied
    decode_weight_bytes: int  # weights one step streams: all but the embedding table, plus the head


def weight_bytes(numels: dict[str, int], itemsize: int, tie_word_embeddings: bool) -> WeightBytes:
    """Split a checkpoint's tensor sizes (`numels`: name -> element count) into the figures above."""
    checkpoint = sum(numels.values()) * itemsize
    embedding = sum(n for name, n in numels.items() if name.endswith(EMBEDDING_SUFFIX)) * itemsize
    is_tied = LM_HEAD_NAME not in numels and tie_word_embeddings
    lm_head = embedding if is_tied else numels.get(LM_HEAD_NAME, 0) * itemsize
    resident = checkpoint + (lm_head if is_tied else 0)
    decode = checkpoint - embedding + (lm_head if is_tied else 0)
    return WeightBytes(checkpoint, embedding, lm_head, is_tied, resident, decode)


def decode_step_bytes(weights: WeightBytes, batch_size: int, mean_context_tokens: float,
                      kv_bytes_per_token: int, embedding_row_bytes: int) -> float:
    """Bytes one decode step of `batch_size` sequences reads: weights once, K/V and embedding rows per sequence."""
    per_sequence = mean_context_tokens * kv_bytes_per_token + embedding_row_bytes
    return weights.decode_weight_bytes + batch_size * per_sequence


def floor_ms(num_bytes: float, bandwidth_bytes_per_s: float) -> float:
    """Milliseconds to stream `num_bytes` at `bandwidth_bytes_per_s`."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth_bytes_per_s}")
    return num_bytes / bandwidth_bytes_per_s * 1000.0


def fraction_of_floor(floor_step_ms: float, measured_ms: float) -> float:
    """`floor_ms / measured_ms`: 1.0 means the step ran at the memory roofline, 0.5 at half of it."""
    if measured_ms <= 0:
        raise ValueError(f"measured time must be > 0, got {measured_ms}")
    return floor_step_ms / measured_ms


def safetensors_numels(model_dir: Path) -> dict[str, int]:
    """name -> element count of every tensor in the checkpoint, read from the safetensors headers only."""
    from tgserve.core.weights import safetensors_files

    numels: dict[str, int] = {}
    for file in safetensors_files(Path(model_dir)):
        with open(file, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
        for name, info in header.items():
            if name != "__metadata__":
                numels[name] = _product(info["shape"])
    return numels


def _product(shape: list[int]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result


def measure_read_bandwidth(num_bytes: int = 512 << 20, repeats: int = 10, num_threads: int | None = None,
                           device: str = "cpu") -> dict:
    """Streaming-read bandwidth of the CPU or device torch computes on: best of `repeats` sums.

    A float32 sum over a tensor much larger than the last-level cache is bound by memory reads; the
    best run is the closest to what the hardware gives. Run it with the engine's thread count (the
    default: torch's current one) so the floor is the one the engine could reach.
    Returns {"read_bytes_per_s", "num_bytes", "num_threads", "repeats", "device"}.
    """
    import torch

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    data = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    best_s = float("inf")
    with torch.inference_mode():
        data.sum()  # first touch and kernel warm-up, not timed
        for _ in range(repeats):
            start = time.perf_counter()
            data.sum().item()  # .item() waits for the device, so the time is the whole read
            best_s = min(best_s, time.perf_counter() - start)
    return {"read_bytes_per_s": data.numel() * 4 / best_s, "num_bytes": data.numel() * 4,
            "num_threads": torch.get_num_threads(), "repeats": repeats, "device": str(data.device)}


def roofline_summary(weights: WeightBytes, kv_bytes_per_token: int, embedding_row_bytes: int,
                     bandwidth_bytes_per_s: float, context_tokens: float) -> dict:
    """The JSON block every report carries: bytes, bandwidth and the batch-1 decode floor at `context_tokens`."""
    step_bytes = decode_step_bytes(weights, 1, context_tokens, kv_bytes_per_token, embedding_row_bytes)
    return {**asdict(weights), "kv_bytes_per_token": kv_bytes_per_token, "embedding_row_bytes": embedding_row_bytes,
            "read_bytes_per_s": bandwidth_bytes_per_s, "batch1_context_tokens": context_tokens,
            "batch1_decode_bytes": step_bytes, "batch1_floor_ms": floor_ms(step_bytes, bandwidth_bytes_per_s)}
