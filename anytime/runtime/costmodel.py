"""What an exit policy costs per image: in the bundle's cost convention (linear in the exits taken), or in
time from a latency profile (`TimeCost`).

Calibration needs one number per threshold vector: the expected cost per image on the validation data.
With reach fractions p_k (the share of images that run stage k; p_1 = 1):

- linear (MACs, or time when every stage runs full batches): sum_k c_k p_k, with c_k stage k's cost per
  image, i.e. the mean of the exits' cumulative costs; with full batches a profile's
  `refill_overhead_seconds` h (the refilling scheduler's own work per row and stage call, measured on a
  stream) adds h sum_k p_k;
- time with per-batch compaction (`TimeCost(mode="per-batch")`, today's executor and `strict`): each batch of
  B images calls stage k on p_k·B rows, and a small call costs more per row, so the time per image is
  sum_k T_k(p_k·B) / B with T_k the profiled seconds of one call (interpolated between measured row counts).

Either way the first stage is cheaper when little of the later stages' work runs between its calls (at a
25% budget most rows leave at the first exit and its calls nearly follow each other): a profile that timed
it back to back prices it between that time and its time in a full chain, by the share of the later work
that runs (`LatencyProfile.batch_seconds`). That makes the full-batch time non-linear in the exits taken.
"""

from __future__ import annotations

import numpy as np

from anytime.errors import ConfigError
from anytime.formats.profile import LatencyProfile
from anytime.runtime.budget import TIME_CONVENTION

# "full-batches": every stage runs full batches (a refilling stage scheduler), cost per row is T_k(B)/B;
# "per-batch": each batch is compacted stage by stage, so stage k runs on the rows of that batch still going.
COST_MODES = ("full-batches", "per-batch")


class TimeCost:
    """Seconds per image of an early-exit policy, from a latency profile."""

    convention = TIME_CONVENTION

    def __init__(self, profile: LatencyProfile, mode: str = "full-batches", batch_size: int | None = None) -> None:
        if mode not in COST_MODES:
            raise ConfigError(f"cost mode {mode!r} is unknown; use one of {', '.join(COST_MODES)}")
        self.profile = profile
        self.mode = mode
        self.batch_size = int(batch_size or profile.batch_size)

    @property
    def linear(self) -> bool:
        """True when the cost is the mean of the exits' cumulative costs (calibration's fast exact path)."""
        return (
            self.mode == "full-batches"
            and self.profile.first_stage_alone_seconds is None
            and not self.profile.refill_overhead_priced
        )

    @property
    def exit_costs(self) -> np.ndarray:
        """Cumulative seconds per image of exits 1..K with every stage on full batches; the budget scale
        (`40%` is 40% of the last) and each result row's time estimate."""
        return self.profile.exit_seconds

    def reach_cost(self, reach: np.ndarray, count: int) -> np.ndarray:
        """Seconds per image given `reach[k, ...]`, the number of the `count` images that run stage k."""
        reach = np.asarray(reach, dtype=np.float64)
        if self.mode == "full-batches":
            # Every call on a full batch: the same as a batch of B whose stage k runs on p_k·B rows, each
            # stage at its full-batch time per row.
            per_row = self.profile.seconds_per_row.reshape((-1,) + (1,) * (reach.ndim - 1))
            cost = (per_row * reach).sum(axis=0) / count
            if self.profile.refill_overhead_priced:
                cost = cost + self.profile.refill_overhead_priced * reach.sum(axis=0) / count
            if self.profile.first_stage_alone_seconds is None:
                return cost
            later = (per_row[1:] * reach[1:]).sum(axis=0)
            every_row_on = per_row[1:].sum() * reach[0]
            b = self.profile.batch_size
            # A straight line here, not the per-batch curve: with full batches the later stages run in whole
            # calls between runs of back-to-back first-stage calls, so the share of first-stage calls that
            # follow later work grows with that work.
            first = self.profile.first_stage_seconds(b, later, every_row_on, measured_curve=False) / b
            return cost + (first - per_row[0]) * reach[0] / count
        rows = reach / count * self.batch_size
        return np.asarray(self.profile.batch_seconds(list(rows)), dtype=np.float64) / self.batch_size

    def __repr__(self) -> str:
        return f"TimeCost({self.profile.bundle_arch}, mode={self.mode!r}, batch_size={self.batch_size})"
