"""What a decoding step costs per row, learned from the steps the server runs.

The adaptive rule (`tgserve.core.speculation.adaptive`) needs `knee_rows` = T0 / t of a decoding
step that costs about T0 + t * rows. Start-up can only time prefill steps (the probe), and a prefill
token is cheaper than a decoding row: a prefill step computes logits for its last token only, while
every decoding or verification row computes its logits over the whole vocabulary and is sampled, and
attends its sequence's whole context. Measured on SmolLM2-135M bf16 (2-core Zen 5): the probe fitted
knees of 29-33 rows, decoding steps cost ~1 ms per row on top of ~15 ms from 8 to 48 rows (knee ~15),
and a rule run at knee 32 added 7% rows per token at 16 concurrent open-ended requests against 3% at
knee 16.

So the engine reports each decoding step (no prompt tokens in it) here, and the fit is a least-squares
line through them with exponentially decayed weights (`DECAY`: the last ~100 steps count). It answers
only once the rows it saw spread enough to place a slope (`MIN_ROWS_STD`) and the slope stands clear
of the steps' noise (`MIN_SLOPE_T`); until then the caller keeps the probe's knee. The noise test is
what keeps a busy machine from steering the rule: with another process taking the cores, step times
swing 2-10x with nothing to do with rows, and an unguarded fit found slopes near zero, so knees of
500 rows (guess everything), on this 2-core VM.
"""
from __future__ import annotations

DECAY = 0.99  # each step keeps this share of the older steps' weight (memory of ~100 steps)
MIN_WEIGHT = 20.0  # decayed steps seen before the fit answers
MIN_ROWS_STD = 2.0  # the rows of those steps spread at least this much (standard deviation, rows)
MIN_SLOPE_T = 4.0  # the slope is at least this many standard errors above zero


class StepCostFit:
    """Decayed least-squares fit of decoding step seconds against rows; host side, engine thread."""

    def __init__(self):
        self._weight = 0.0  # sum of weights
        self._rows = 0.0  # weighted sums of rows, seconds, rows^2 and rows * seconds
        self._seconds = 0.0
        self._rows_sq = 0.0
        self._rows_seconds = 0.0
        self._seconds_sq = 0.0

    def add(self, num_rows: int, step_s: float) -> None:
        """One decoding step of `num_rows` rows (decodes plus verified guesses) that took `step_s` seconds."""
        self._weight = DECAY * self._weight + 1.0
        self._rows = DECAY * self._rows + num_rows
        self._seconds = DECAY * self._seconds + step_s
        self._rows_sq = DECAY * self._rows_sq + num_rows * num_rows
        self._rows_seconds = DECAY * self._rows_seconds + num_rows * step_s
        self._seconds_sq = DECAY * self._seconds_sq + step_s * step_s

    def knee_rows(self) -> float | None:
        """T0 / t of the fitted line, or None while the steps seen cannot place it (too few, rows too
        alike, or a slope lost in the noise of the step times)."""
        weight = self._weight
        if weight < MIN_WEIGHT:
            return None
        mean_rows = self._rows / weight
        rows_var = self._rows_sq / weight - mean_rows * mean_rows
        if rows_var < MIN_ROWS_STD * MIN_ROWS_STD:
            return None
        mean_s = self._seconds / weight
        slope_s = (self._rows_seconds / weight - mean_rows * mean_s) / rows_var
        residual_var = max(0.0, self._seconds_sq / weight - mean_s * mean_s - slope_s * slope_s * rows_var)
        if slope_s <= 0 or slope_s * slope_s * weight * rows_var < MIN_SLOPE_T ** 2 * residual_var:
            return None
        return (mean_s - slope_s * mean_rows) / slope_s
