"""A test backend with static shapes: the cpu backend plus prefill/decode buckets and fixed batch slots.

It stands in for Gaudi (buckets) and Inferentia (slots) on a CPU. `tgserve_get_shape_constraints`
declares them; `tgserve_make_model_runner` returns the core's runner around the core's model, both
wrapped to write down every step they see (`JOURNAL`) so a test can check that each one has a
bucket shape. Registered in-process (`BackendRegistry(extra_plugins={"bucketed": this module})`),
through the same plugin manager and hooks as an installed vendor plugin; nothing in tgserve names it.
"""
from __future__ import annotations

from dataclasses import dataclass

from tgserve.backends.cpu.plugin import (  # noqa: F401  (re-exported: these are this plugin's hooks)
    tgserve_get_block_size,
    tgserve_get_default_dtype,
    tgserve_get_device,
    tgserve_get_dist_backend,
    tgserve_get_free_memory_bytes,
    tgserve_make_linear_method,
    tgserve_synchronize,
)
from tgserve.core import default_plugin
from tgserve.core.backend_status import BackendStatus
from tgserve.core.hookspecs import hookimpl
from tgserve.core.shape_constraints import ShapeConstraints

NAME = "bucketed"
PREFILL_TOKEN_BUCKETS = (16, 32, 64)
DECODE_BATCH_BUCKETS = (1, 2, 4)
NUM_SLOTS = 4
CONSTRAINTS = ShapeConstraints(max_batch_size=NUM_SLOTS, prefill_token_buckets=PREFILL_TOKEN_BUCKETS,
                               decode_batch_buckets=DECODE_BATCH_BUCKETS, is_slot_based=True)


@dataclass(slots=True)
class SeenStep:
    """One model forward as this backend saw it: the plan's sequences and the batch's shapes (host copies)."""

    request_ids: list[int]  # plan order
    plan_slots: list[int | None]  # Sequence.batch_slot of each, plan order
    query_lens: list[int]  # ScheduledSequence.num_new_tokens, plan order
    num_sampled: list[int]  # ScheduledSequence.num_sampled, plan order
    num_token_rows: int  # batch.input_ids.shape[0]
    num_seq_rows: int  # batch.query_lens.shape[0]
    batch_slots: list[int]  # batch.batch_slots
    logits_indices: list[int]
    padding_slot_mapping: list[int]  # batch.slot_mapping of the padding token rows
    padding_block_tables: list[list[int]]  # batch.block_tables rows of the padding sequences
    data_ptrs: tuple[int, ...]  # addresses of input_ids, positions, slot_mapping, block_tables, query_lens


JOURNAL: list[SeenStep] = []  # every step since start-up (warmup included); engine thread appends


class _CheckedModel:
    """The core's model; each forward writes the batch the runner built for the current plan down."""

    def __init__(self, model):
        self.model = model
        self.plan = None  # set by the runner before each forward

    def load_weights(self, weights):
        self.model.load_weights(weights)

    def compute_logits(self, hidden):
        return self.model.compute_logits(hidden)

    def forward(self, batch, kv_cache):
        plan = self.plan
        JOURNAL.append(SeenStep(
            request_ids=[s.seq.request_id for s in plan.scheduled],
            plan_slots=[s.seq.batch_slot for s in plan.scheduled],
            query_lens=[s.num_new_tokens for s in plan.scheduled], num_sampled=[s.num_sampled for s in plan.scheduled],
            num_token_rows=batch.input_ids.shape[0], num_seq_rows=batch.query_lens.shape[0],
            batch_slots=batch.batch_slots.tolist(), logits_indices=batch.logits_indices.tolist(),
            padding_slot_mapping=batch.slot_mapping[batch.num_tokens:].tolist(),
            padding_block_tables=batch.block_tables[batch.num_seqs:].tolist(),
            data_ptrs=tuple(t.data_ptr() for t in (batch.input_ids, batch.positions, batch.slot_mapping,
                                                   batch.block_tables, batch.query_lens))))
        return self.model.forward(batch, kv_cache)


class _CheckedRunner:
    """The core's runner around the checked model: hands the model the plan it is about to run."""

    def __init__(self, runner, model: _CheckedModel):
        self.runner = runner
        self.model = model
        self.vocab_size = runner.vocab_size
        self.device = runner.device

    def execute(self, plan):
        self.model.plan = plan
        return self.runner.execute(plan)


@hookimpl
def tgserve_get_backend_status():
    return BackendStatus(name=NAME, is_usable=True, priority=-1)  # never picked by `auto`


@hookimpl
def tgserve_get_shape_constraints(model_config, config):
    return CONSTRAINTS


@hookimpl
def tgserve_make_model_runner(model, kv_cache, attention, step_inputs, device, vocab_size, config):
    checked = _CheckedModel(model)
    runner = default_plugin.tgserve_make_model_runner(model=checked, kv_cache=kv_cache, attention=attention,
                                                      step_inputs=step_inputs, device=device,
                                                      vocab_size=vocab_size, config=config)
    return _CheckedRunner(runner, checked)
