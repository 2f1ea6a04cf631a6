"""One engine step on the device: plan -> tensors -> model -> logits -> sampled tokens -> host.

The plan's inputs go into persistent device buffers (`tgserve.core.step_inputs`); host work is per
sequence (a few list writes); everything per token happens in vectorised array or tensor ops. The
only device-to-host transfer is the single packed read of the sampled ids and logprobs. This is the
core's runner; a backend may supply its own through `tgserve_make_model_runner`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tgserve.core.forward_batch import ForwardBatch
from tgserve.core.step_inputs import StepInputs
from tgserve.core.step_masks import StepMasks
from tgserve.core.step_plan import StepPlan
from tgserve.core.sampling import SamplingBatch, sample
from tgserve.core.token_history import TokenHistory
from tgserve.core.watermark import DEFAULT_DELTA, DEFAULT_GAMMA, WatermarkBatch


@dataclass(slots=True)
class SampledToken:
    id: int
    logprob: float
    top: list[tuple[int, float]]  # (id, logprob), best first; empty unless top_n_tokens was asked


@dataclass(slots=True)
class StepOutput:
    # item.num_sampled tokens per sampling sequence of the plan, in plan order, each sequence's in
    # position order (the token sampled after its i-th sampled position at index i).
    sampled: list[SampledToken]
    prompt_logprobs: dict[int, list[float]]  # request_id -> logprobs of prompt tokens computed this step
    # With Medusa heads (`ModelRunner.heads`): per entry of `sampled`, the heads' top-1 guesses at the
    # num_heads tokens after that entry's token; [] without heads.
    head_ids: list[list[int]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model, kv_cache, attention, device: torch.device, vocab_size: int, inputs: StepInputs,
                 watermark_gamma: float = DEFAULT_GAMMA, watermark_delta: float = DEFAULT_DELTA):
        self.model = model
        self.inputs = inputs  # the plan -> ForwardBatch preparation (`tgserve_make_step_inputs`)
        self.kv_cache = kv_cache
        self.attention = attention
        self.device = device
        self.vocab_size = vocab_size
        self.block_size = kv_cache.block_size
        self.watermark_gamma = watermark_gamma  # --watermark-gamma: green share of the vocabulary
        self.watermark_delta = watermark_delta  # --watermark-delta: logit bias of green ids
        self.token_history = TokenHistory(device, pad_id=vocab_size)  # ids seen by penalized sequences
        self.masks = StepMasks(vocab_size, device)  # allowed-token masks of requests with masking states
        # Medusa heads (`tgserve.core.speculation.medusa_heads.MedusaHeads`) applied to every sampled
        # row in the same step, set by start-up after construction; None: no head guesses.
        self.heads = None
        # Rank 0 of a sharded server: the `StepBroadcast` that hands each step's batch to the other ranks
        # before the forward (they run the same forward and logits), set by start-up; None: one rank.
        self.step_broadcast = None

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        batch, sampling_rows = self._forward_batch(plan)
        prompt_rows = _prompt_rows(plan)
        if self.step_broadcast is not None:  # the step's one crossing to the other ranks
            self.step_broadcast.send_step(batch, prompt_rows.rows, plan.max_block_id)
        hidden = self.model.forward(batch, self.kv_cache)
        prompt_logprobs = self._prompt_logprobs(prompt_rows, hidden)
        if not sampling_rows:
            return StepOutput([], prompt_logprobs)
        sampled_hidden = hidden.index_select(0, batch.logits_indices)
        logits = self.model.compute_logits(sampled_hidden)
        out = sample(logits, self._sampling_batch([plan.scheduled[i] for i in sampling_rows]))
        columns = [out.next_ids.unsqueeze(1).double(), out.logprobs.unsqueeze(1).double()]
        if out.top_ids is not None:
            columns += [out.top_ids.double(), out.top_logprobs.double()]
        heads = self.heads
        if heads is not None:  # the last num_heads columns: every head's guess at every sampled row
            columns.append(heads.top_ids(sampled_hidden, self.model.compute_logits).double())
        rows = torch.cat(columns, dim=1).cpu().tolist()  # the one host sync of the step
        if heads is None:
            return StepOutput([_sampled(row) for row in rows], prompt_logprobs)
        width = len(rows[0]) - heads.num_heads
        return StepOutput([_sampled(row[:width]) for row in rows], prompt_logprobs,
                          [[int(token_id) for token_id in row[width:]] for row in rows])

    def _forward_batch(self, plan: StepPlan) -> tuple[ForwardBatch, list[int]]:
        """The step's device batch (persistent inputs, attention prepared) and its sampling sequences."""
        self.kv_cache.initialize_blocks(plan.max_block_id)  # every block this step reads holds finite values
        batch = self.inputs.prepare(plan)
        batch.attention = self.attention.prepare(batch)
        return batch, [i for i, item in enumerate(plan.scheduled) if item.is_sampling]

    def _sampling_batch(self, items: list) -> SamplingBatch:
        """One row per sampled position: a sequence verifying k proposed tokens has k + 1 rows, row j
        drawing its token number `num_generated_tokens + j` after the accepted tokens and j proposals."""
        seqs, offsets = [], []
        for item in items:
            seqs += [item.seq] * item.num_sampled
            offsets += range(item.num_sampled)
        params = [s.request.sampling for s in seqs]
        is_penalized = [p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 for p in params]
        history = None
        if any(is_penalized):  # rows without a penalty see no history (neutral values change nothing)
            history = self.token_history.rows(seqs, [len(s.token_ids) - s.num_proposed_tokens + j if is_p else 0
                                                     for s, j, is_p in zip(seqs, offsets, is_penalized)])
        return SamplingBatch.from_params(
            params, [s.num_generated_tokens + j for s, j in zip(seqs, offsets)], self.device, token_history=history,
            max_top_n=max(s.request.top_n_tokens for s in seqs),
            watermark=self._watermark_batch(seqs, offsets) if any(p.watermark for p in params) else None,
            **self._allowed(items))

    def _allowed(self, items: list) -> dict:
        """The sampler's allowed_bits / allowed_rows, built only when a sequence of the step holds states."""
        if not any(item.seq.states for item in items):
            return {}
        bits, rows = self.masks.build(items)
        return {"allowed_bits": bits, "allowed_rows": rows}

    def _watermark_batch(self, seqs: list, offsets: list[int]) -> WatermarkBatch:
        """Each row's previous token (the greenlist seed) and flag; built only when a row asked."""
        dev = self.device
        previous = [s.token_ids[len(s.token_ids) - s.num_proposed_tokens - 1 + j] for s, j in zip(seqs, offsets)]
        return WatermarkBatch(
            prev_ids=torch.tensor(previous, dtype=torch.int64).to(dev),
            is_watermarked=torch.tensor([s.request.sampling.watermark for s in seqs], dtype=torch.bool).to(dev),
            gamma=self.watermark_gamma, delta=self.watermark_delta)

    def _prompt_logprobs(self, prompt_rows: "_PromptRows", hidden: torch.Tensor) -> dict[int, list[float]]:
        """Logprobs of prompt tokens for requests that asked (decoder_input_details); rare, so simple.
        Computed before the sampled rows' logits, in the order the other ranks of a sharded server follow."""
        if not prompt_rows.rows:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(prompt_rows.rows, device=self.device)])
        target_t = torch.tensor(prompt_rows.targets, device=self.device).unsqueeze(1)
        values = torch.log_softmax(logits, dim=-1).gather(1, target_t).squeeze(1).tolist()
        result: dict[int, list[float]] = {}
        for owner, value in zip(prompt_rows.owners, values):
            result.setdefault(owner, []).append(value)
        return result


@dataclass(slots=True)
class _PromptRows:
    """The hidden rows of a step whose logits score prompt tokens (host lists, one entry per row)."""

    rows: list[int]  # row of the step's hidden states [T, hidden]
    targets: list[int]  # the prompt token that row predicts
    owners: list[int]  # the request id it belongs to


def _prompt_rows(plan: StepPlan) -> _PromptRows:
    """Rows of prompt positions computed this step for requests with `prefill_logprobs` (usually none)."""
    found = _PromptRows([], [], [])
    offset = 0
    for item in plan.scheduled:
        seq, start = item.seq, item.seq.num_computed_tokens
        if seq.request.prefill_logprobs and start < seq.num_prompt_tokens:
            for position in range(start, min(start + item.num_new_tokens, seq.num_prompt_tokens - 1)):
                found.rows.append(offset + position - start)
                found.targets.append(seq.token_ids[position + 1])
                found.owners.append(seq.request_id)
        offset += item.num_new_tokens
    return found


def _sampled(row: list[float]) -> SampledToken:
    num_top = (len(row) - 2) // 2
    top = [(int(row[2 + j]), row[2 + num_top + j]) for j in range(num_top)]
    return SampledToken(int(row[0]), row[1], top)
