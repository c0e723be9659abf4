"""Joint training: one backward of the (optionally weighted) sum of the exits' losses.

The per-exit losses arrive already weighted by the run's exit weighting (`--exit-weights`: constant, or
the SDN ramp that SDN presets default to); `weights` multiplies them by fixed per-exit factors on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from anytime.errors import ConfigError
from anytime.training.base import MethodOptions, TrainingContext
from anytime.training.methods.stepwise import StepwiseMethod


@dataclass(frozen=True)
class JointOptions(MethodOptions):
    weights: tuple[float, ...] | None = None  # fixed per-exit factors (default: all 1)

    def __post_init__(self) -> None:
        if self.weights is not None and (not self.weights or any(not w >= 0 for w in self.weights)):
            raise ConfigError(f"joint weights={self.weights!r}: give one weight >= 0 per exit, e.g. weights=1,1,1,1")


class JointTraining(StepwiseMethod):
    name = "joint"
    Options = JointOptions
    options: JointOptions

    def setup(self, ctx: TrainingContext) -> None:
        w = self.options.weights
        if w is not None and len(w) != ctx.num_exits:
            raise ConfigError(
                f"joint weights={w!r} has {len(w)} values but the model has {ctx.num_exits} exits; "
                f"give {ctx.num_exits} comma-separated weights"
            )
        self.num_exits = ctx.num_exits

    def exit_weights(self) -> list[float]:
        if self.options.weights is not None:
            return [float(v) for v in self.options.weights]
        return [1.0] * self.num_exits

    def backward(self, ctx: TrainingContext, losses: list[torch.Tensor], epoch: int) -> None:
        total: Any = sum(w * loss for w, loss in zip(self.exit_weights(), losses))
        total.backward()
