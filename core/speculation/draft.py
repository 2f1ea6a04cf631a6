"""Draft-model proposals (`--speculative-model`): a smaller model with the target's vocabulary guesses
each decoding sequence's next k tokens greedily, all sequences batched, before the step verifies them.

KV cache: the draft's K/V live in a cache of their own (`draft_kv`) with the target's block count and
block size, indexed by the same block ids and slots: a sequence's block table serves both models, so
admission reserves blocks once and a finished sequence frees both at once. Verified positions stay
inside the blocks reserved at admission (the engine limits k), and so do the draft's.

Per step, for the sequences that propose: one batched draft forward over the tokens the draft has not
computed yet (after a prompt the whole prompt, chunked like a prefill under the step's token budget;
later the 1 or 2 tokens the last verification added past what the draft already holds), whose last
rows give guess 1, then k - 1 batched one-token forwards, each feeding the previous guess. The draft's
computed count per sequence (`DraftState`) then rolls back to what verification accepted (`observe`):
its K/V at rejected positions are overwritten when those positions are computed again.

Guesses and acceptance: the engine keeps a guess only where it equals the token the target draws at
that position (`acceptance.accept_matching_prefix`), and the target's draw at a position depends only
on the accepted tokens before it and the request's seed (the sampler's Gumbel noise is keyed by seed,
generated-token index and id). So whatever the draft guesses, the output is token for token what
`--speculate 0` gives, greedy and seeded alike: the distribution is exact and a seed means the same
text with and without speculation. What the draft's guess decides is only how often it is kept. The
draft guesses with the target's own draw: greedy rows take its argmax; sampled rows draw from the
draft's distribution (temperature, top-k, top-p, typical-p of the request applied to its logits)
with the same Gumbel noise the target's row at that position will use (`sampling.sample`): a
Gumbel-max coupling, in which the draft's draw equals the target's with probability at least
(1 - TV(p, q)) / (1 + TV(p, q)), and always where the two distributions agree (the draft as its own
target matches every time). Measured on the demo model with its one-layer draft, --speculate 4, 24
sampled requests at temperature 1.0: 2.70 tokens per step, against 2.57 guessing the draft's argmax
(greedy requests: 3.24). This stands in for rejection sampling with the draft's probabilities (accept
x ~ q with min(1, p/q), else resample from max(0, p - q)), which accepts at exactly 1 - TV(p, q) but
whose output depends on the draft: a seeded request would then no longer give `--speculate 0`'s text. Penalties, watermarks and grammar masks are left to verification (a guess they would forbid is
just rejected). Each draft forward reads its guesses to the host (k syncs a step): the next forward's
inputs are built there; the target's step keeps its one sync.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tgserve.core.invariants import EngineInvariantError
from tgserve.core.sampling import SamplingBatch, sample
from tgserve.core.sequence import Sequence
from tgserve.core.speculation.acceptance import Proposer
from tgserve.core.step_inputs import StepInputs
from tgserve.core.step_plan import ScheduledSequence, StepPlan

log = logging.getLogger(__name__)
METHOD = "draft"  # the name in TGI's start-up line ("Using speculation draft with N input ids.")


@dataclass(slots=True)
class DraftState:
    """The draft's progress on one sequence (`Sequence.proposer_state`), host side."""

    # Leading positions of seq.token_ids whose draft K/V are in the draft cache and whose tokens are accepted.
    num_computed: int = 0
    # Guesses of the last proposal the draft computed K/V for, at the positions from num_computed on;
    # `observe` keeps those that verification accepted.
    num_fed_proposals: int = 0


@dataclass(slots=True, eq=False)
class _DraftView:
    """What `StepInputs.prepare` reads of a sequence, with the draft's computed count in place of the target's."""

    token_ids: list[int]  # the sequence's own list (accepted tokens, then this step's guesses so far)
    num_computed_tokens: int  # positions the draft cache holds
    block_ids: list[int]  # the sequence's blocks: the same ids index the draft cache
    batch_slot: int | None
    num_proposed_tokens: int = 0  # a draft forward samples at the end of what it computes


class DraftProposer(Proposer):
    """Greedy guesses of a draft model (`tgserve.core.speculation.Proposer`, method "draft")."""

    method = METHOD

    def __init__(self, model, attention, kv_cache, inputs: StepInputs, device: torch.device, num_tokens: int,
                 max_step_tokens: int, max_step_seqs: int):
        """model / attention / kv_cache: the draft's, built through the backend's hooks (kv_cache with the
        target's block count and size); inputs: its own persistent step inputs; num_tokens: --speculate;
        max_step_tokens / max_step_seqs: the most tokens and sequences one draft forward computes."""
        self.model = model
        self.attention = attention
        self.kv_cache = kv_cache
        self.inputs = inputs
        self.device = device
        self.num_tokens = num_tokens
        self.max_step_tokens = max_step_tokens
        self.max_step_seqs = max_step_seqs

    @torch.inference_mode()
    def propose_batch(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        limits = [min(self.num_tokens, limit) for limit in limits]
        states = [self._state(seq) for seq in seqs]
        self.kv_cache.initialize_blocks(max(max(seq.block_ids) for seq in seqs))
        num_accepted = [len(seq.token_ids) for seq in seqs]
        views = [_DraftView(seq.token_ids, state.num_computed, seq.block_ids, seq.batch_slot)
                 for seq, state in zip(seqs, states)]
        proposals: list[list[int]] = [[] for _ in seqs]
        is_failed = False
        try:
            # Catch up; the last row of each sequence draws its guess 1 (its generated-token index first).
            first_steps = [length - seq.num_prompt_tokens for seq, length in zip(seqs, num_accepted)]
            for i, guess in enumerate(self._forward(views, seqs, first_steps)):
                proposals[i].append(guess)
            for j in range(1, max(limits, default=0)):
                active = [i for i, limit in enumerate(limits) if limit > j]
                for i in active:
                    seqs[i].token_ids.append(proposals[i][-1])
                guesses = self._forward([views[i] for i in active], [seqs[i] for i in active],
                                        [first_steps[i] + j for i in active])
                for i, guess in zip(active, guesses):
                    proposals[i].append(guess)
        except EngineInvariantError:  # the engine's own state is broken: it stops (Engine._stop_broken)
            raise
        except Exception:  # a failed draft forward costs this step its guesses, never a request its output
            log.exception("draft forward failed: this step verifies no guesses")
            is_failed = True
        finally:
            for seq, length in zip(seqs, num_accepted):
                del seq.token_ids[length:]  # the engine appends the guesses it keeps itself
        if is_failed:  # the states still hold what the draft cache held before (later K/V get overwritten)
            return [[] for _ in seqs]
        for state, length, proposed in zip(states, num_accepted, proposals):
            state.num_computed = length  # the guesses' K/V count once verification accepted them
            state.num_fed_proposals = len(proposed) - 1
        return [proposed[:limit] for proposed, limit in zip(proposals, limits)]

    def observe(self, seq: Sequence, num_proposed: int, num_accepted: int) -> None:
        """Keep the draft K/V of the guesses that were accepted (the first num_accepted - 1)."""
        state = seq.proposer_state
        if isinstance(state, DraftState):
            state.num_computed += min(state.num_fed_proposals, num_accepted - 1)
            state.num_fed_proposals = 0

    @staticmethod
    def _state(seq: Sequence) -> DraftState:
        if not isinstance(seq.proposer_state, DraftState):
            seq.proposer_state = DraftState()
        state = seq.proposer_state
        state.num_fed_proposals = 0  # guesses not verified (dropped by the step's budget) are not kept
        return state

    def _forward(self, views: list[_DraftView], seqs: list[Sequence], steps: list[int]) -> list[int]:
        """Compute every view's uncomputed tokens in as few draft forwards as the step limits allow;
        the draft's guess after each view's last token, in view order (`seqs[i]`'s request's
        sampling, drawing its generated token number `steps[i]`)."""
        guesses: dict[int, int] = {}
        pending = [i for i, view in enumerate(views) if view.num_computed_tokens < len(view.token_ids)]
        while pending:
            plan, owners, budget = StepPlan(), [], self.max_step_tokens
            for i in pending:
                if budget == 0 or len(plan.scheduled) == self.max_step_seqs:
                    break
                view = views[i]
                num_tokens = min(len(view.token_ids) - view.num_computed_tokens, budget)
                plan.scheduled.append(ScheduledSequence(view, num_tokens))
                owners.append(i)
                budget -= num_tokens
            order = sorted(range(len(owners)), key=lambda n: plan.scheduled[n].num_new_tokens != 1)
            plan.scheduled = [plan.scheduled[n] for n in order]  # one-token rows first, as the runner's
            owners = [owners[n] for n in order]
            sampling = [i for i, item in zip(owners, plan.scheduled) if item.is_sampling]
            for i, guess in zip(sampling, self._run(plan, [seqs[i] for i in sampling], [steps[i] for i in sampling])):
                guesses[i] = guess
            for i, item in zip(owners, plan.scheduled):
                views[i].num_computed_tokens += item.num_new_tokens
            pending = [i for i in pending if views[i].num_computed_tokens < len(views[i].token_ids)]
        return [guesses[i] for i in range(len(views))]  # every view had a token to compute

    def _run(self, plan: StepPlan, seqs: list[Sequence], steps: list[int]) -> list[int]:
        """One draft forward of `plan`: the guess at each sampling item's last row, in plan order
        (`seqs` and `steps` give each sampling item's sequence and generated-token index)."""
        batch = self.inputs.prepare(plan)
        batch.attention = self.attention.prepare(batch)
        hidden = self.model.forward(batch, self.kv_cache)
        if not seqs:
            return []
        logits = self.model.compute_logits(hidden.index_select(0, batch.logits_indices))
        return sample(logits, self._sampling_batch(seqs, steps)).next_ids.tolist()

    def _sampling_batch(self, seqs: list[Sequence], steps: list[int]) -> SamplingBatch:
        """The rows' draw as the target's sampler makes it at the same positions (same seed and index,
        hence the same noise), without penalties, watermark or masks (verification applies those)."""
        return SamplingBatch.from_params([seq.request.sampling for seq in seqs], steps, self.device,
                                         with_penalties=False)
