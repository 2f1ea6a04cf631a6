"""The step crossing from rank 0 to the other ranks: one fixed header and one flat payload per message.

Rank 0 runs the scheduler and prepares each step's `ForwardBatch`; the other ranks must run exactly
that forward over their shard. Rather than one collective per input tensor, rank 0 concatenates the
batch's int64 index tensors (input ids, positions, slot mapping, block tables, context and query
lengths, cu_seqlens_q, logits indices, the rows that get prompt logprobs, batch slots) into one flat
payload and sends two broadcasts: a header of `HEADER_SIZE` int64s (the message kind, every part's
length and the batch's host ints) and then the payload. The receiving rank cuts the payload back
into views and prepares attention itself, so attention metadata never crosses.

The header travels on a gloo group over host memory (`control_group`) whatever the device's
communicator is: an idle server leaves the other ranks waiting in that broadcast for as long as no
request comes, which a host group with a long timeout allows, while a device communicator's
watchdog (NCCL's) would abort it. The payload goes over the model's group, onto the device where
the forward reads it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

from tgserve.core.distributed.tensor_parallel import TensorParallel
from tgserve.core.forward_batch import ForwardBatch


class MessageKind(IntEnum):
    """What rank 0 tells the other ranks to do next."""

    STEP = 1  # run the forward of the batch in the payload (and its logits)
    KV_CACHE = 2  # replace the KV cache by one of `num_blocks` blocks (the probe's scratch cache, then serving)
    SHUTDOWN = 3  # leave the loop: the server is stopping


# Header slots, in order: int64 each. Sizes: T token rows, S sequence rows, W block-table width,
# L logits rows, P prompt-logprob rows; then the batch's host ints (`ForwardBatch`); num_blocks: KV_CACHE's.
_HEADER = ("kind", "payload_len", "num_token_rows", "num_seq_rows", "table_width", "num_logits",
           "num_prompt_rows", "has_batch_slots", "max_query_len", "max_context_len", "num_decode_seqs",
           "max_decode_context_len", "max_prefill_context_len", "num_tokens", "num_seqs", "max_block_id",
           "num_blocks")
HEADER_SIZE = len(_HEADER)
_SLOT = {name: index for index, name in enumerate(_HEADER)}


@dataclass(slots=True)
class StepMessage:
    """One message as a receiving rank sees it (device tensors are views of its payload buffer)."""

    kind: MessageKind
    num_blocks: int = 0  # KV_CACHE: blocks of the new cache
    max_block_id: int = 0  # STEP: highest block id the step reads (the runner initializes up to it)
    batch: ForwardBatch | None = None  # STEP: the forward's inputs, attention not yet prepared
    prompt_rows: torch.Tensor | None = None  # STEP: int64 [P], hidden rows whose logits give prompt logprobs


class StepBroadcast:
    """Rank 0's side: sends each message to every other rank. Every rank must be in its receive loop.

    The header and the payload are persistent buffers filled in place (the payload grows with the
    largest step), as the step inputs are: no tensor is built per step but the prompt-logprob rows'."""

    def __init__(self, tp: TensorParallel, control_group, device: torch.device):
        self.tp = tp
        self.control_group = control_group  # gloo group of the same ranks, on the host
        self.device = device
        self._source = dist.get_global_rank(tp.group, 0)
        self._header = torch.zeros(HEADER_SIZE, dtype=torch.int64)
        self._header_slots = self._header.numpy()  # the same memory: filled with plain int stores
        self._payload = torch.zeros(0, dtype=torch.int64, device=device)
        self.num_messages = 0  # messages sent so far (each a header and at most one payload broadcast)

    def send_step(self, batch: ForwardBatch, prompt_rows: list[int], max_block_id: int) -> None:
        """Send one step's batch (before rank 0 runs its own forward over it) and the prompt-logprob rows."""
        parts = [batch.input_ids, batch.positions, batch.slot_mapping, batch.block_tables.reshape(-1),
                 batch.context_lens, batch.query_lens, batch.cu_seqlens_q, batch.logits_indices]
        if prompt_rows:
            parts.append(torch.tensor(prompt_rows, dtype=torch.int64).to(self.device))
        if batch.batch_slots is not None:
            parts.append(batch.batch_slots)
        payload_len = sum(part.numel() for part in parts)
        if self._payload.numel() < payload_len:
            self._payload = torch.zeros(payload_len, dtype=torch.int64, device=self.device)
        payload = self._payload[:payload_len]
        torch.cat(parts, out=payload)
        num_seq_rows, table_width = batch.block_tables.shape
        self._send(dict(
            kind=MessageKind.STEP, payload_len=payload_len, num_token_rows=batch.input_ids.numel(),
            num_seq_rows=num_seq_rows, table_width=table_width, num_logits=batch.logits_indices.numel(),
            num_prompt_rows=len(prompt_rows), has_batch_slots=int(batch.batch_slots is not None),
            max_query_len=batch.max_query_len, max_context_len=batch.max_context_len,
            num_decode_seqs=batch.num_decode_seqs, max_decode_context_len=batch.max_decode_context_len,
            max_prefill_context_len=batch.max_prefill_context_len, num_tokens=batch.num_tokens,
            num_seqs=batch.num_seqs, max_block_id=max_block_id), payload)

    def send_kv_cache(self, num_blocks: int) -> None:
        """Every rank allocates a KV cache of `num_blocks` blocks for the steps that follow (its own heads)."""
        self._send(dict(kind=MessageKind.KV_CACHE, num_blocks=num_blocks), None)

    def send_shutdown(self) -> None:
        """The other ranks leave their loop and exit."""
        self._send(dict(kind=MessageKind.SHUTDOWN), None)

    def _send(self, fields: dict[str, int], payload: torch.Tensor | None) -> None:
        self._header_slots[:] = 0
        for name, value in fields.items():
            self._header_slots[_SLOT[name]] = value
        started_s = time.perf_counter()
        dist.broadcast(self._header, src=self._source, group=self.control_group)
        self.tp.clock.add(started_s)
        if payload is not None:
            started_s = time.perf_counter()
            dist.broadcast(payload, src=self._source, group=self.tp.group)
            self.tp.clock.add(started_s)
        self.num_messages += 1


class StepReceiver:
    """A rank other than 0: receives rank 0's messages into one payload buffer that grows as steps do."""

    def __init__(self, tp: TensorParallel, control_group, device: torch.device):
        self.tp = tp
        self.control_group = control_group
        self.device = device
        self._source = dist.get_global_rank(tp.group, 0)
        self._header = torch.zeros(HEADER_SIZE, dtype=torch.int64)
        self._payload = torch.zeros(0, dtype=torch.int64, device=device)

    def receive(self) -> StepMessage:
        """Wait for rank 0's next message (as long as the server is idle) and return it."""
        dist.broadcast(self._header, src=self._source, group=self.control_group)
        header = dict(zip(_HEADER, self._header.tolist()))
        kind = MessageKind(header["kind"])
        if kind is MessageKind.KV_CACHE:
            return StepMessage(kind, num_blocks=header["num_blocks"])
        if kind is MessageKind.SHUTDOWN:
            return StepMessage(kind)
        if self._payload.numel() < header["payload_len"]:
            self._payload = torch.zeros(header["payload_len"], dtype=torch.int64, device=self.device)
        payload = self._payload[:header["payload_len"]]
        dist.broadcast(payload, src=self._source, group=self.tp.group)
        return _unpack(header, payload)


def _unpack(header: dict[str, int], payload: torch.Tensor) -> StepMessage:
    """Cut the payload back into the batch's fields, in `StepBroadcast.send_step`'s order."""
    t, s, w = header["num_token_rows"], header["num_seq_rows"], header["table_width"]
    sizes = [t, t, t, s * w, s, s, s + 1, header["num_logits"], header["num_prompt_rows"]]
    if header["has_batch_slots"]:
        sizes.append(s)
    parts = payload.split(sizes)
    ids, positions, slot_mapping, tables, context_lens, query_lens, cu_seqlens_q, logits_indices, rows = parts[:9]
    batch = ForwardBatch(
        input_ids=ids, positions=positions, slot_mapping=slot_mapping, block_tables=tables.view(s, w),
        context_lens=context_lens, query_lens=query_lens, cu_seqlens_q=cu_seqlens_q,
        logits_indices=logits_indices, max_query_len=header["max_query_len"],
        max_context_len=header["max_context_len"], num_decode_seqs=header["num_decode_seqs"],
        max_decode_context_len=header["max_decode_context_len"],
        max_prefill_context_len=header["max_prefill_context_len"], num_tokens=header["num_tokens"],
        num_seqs=header["num_seqs"], batch_slots=parts[9] if header["has_batch_slots"] else None)
    return StepMessage(MessageKind.STEP, max_block_id=header["max_block_id"], batch=batch, prompt_rows=rows)
