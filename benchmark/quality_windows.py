"""Teacher-forced windows over a long token stream: which positions each window scores, and its scores.

Hugging Face's strided perplexity recipe: window i feeds tokens [begin, end) with begin = i * stride
and scores only the targets no earlier window scored, so every scored token past the first window
sees at least `window - stride` tokens of context, and each token after the first is scored exactly
once. A target at position t is predicted by the logits of position t - 1, so the stride must be
below the window: with stride == window (HF's "no overlap"), each window's first token would never
be a target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True, frozen=True)
class Window:
    """One forward over tokens [begin, end) that scores targets [first_target, end) (host ints)."""

    begin: int  # first token fed
    end: int  # one past the last token fed
    first_target: int  # first position whose token is scored; begin < first_target < end

    @property
    def num_targets(self) -> int:
        return self.end - self.first_target


def windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows covering `num_tokens` tokens; every position in [1, num_tokens) scored once.

    Raises ValueError unless 2 <= window, 1 <= stride < window, num_tokens >= 2."""
    if window < 2 or not 1 <= stride < window:
        raise ValueError(f"need window >= 2 and 1 <= stride < window (at stride == window each window's first "
                         f"token is never scored), got window {window}, stride {stride}")
    if num_tokens < 2:
        raise ValueError(f"the text has {num_tokens} token(s); perplexity needs at least 2")
    result, scored_until = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        first_target = max(scored_until, begin + 1)
        if first_target < end:
            result.append(Window(begin, end, first_target))
        scored_until = end
        if end == num_tokens:
            break
    return result


@dataclass(slots=True)
class WindowScores:
    """What one window's logits say about its targets (device-independent: on the CPU)."""

    nll_sum: float  # sum over the targets of -log p(target), natural log
    predicted: torch.Tensor  # int64 [num_targets]: argmax of the logits at each target's position
    num_correct: int  # targets whose token is the argmax


def score_window(logits: torch.Tensor, token_ids: list[int], w: Window) -> WindowScores:
    """logits: float [w.end - w.begin, vocab], row j after token begin + j; token_ids: the whole stream."""
    rows = logits[w.first_target - 1 - w.begin: w.end - 1 - w.begin].float()
    targets = torch.tensor(token_ids[w.first_target:w.end], dtype=torch.int64, device=rows.device)
    nll = -torch.log_softmax(rows, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    predicted = rows.argmax(dim=-1)
    return WindowScores(nll_sum=float(nll.double().sum()), predicted=predicted.cpu(),
                        num_correct=int((predicted == targets).sum()))
