"""Joint training: one backward of the (optionally weighted) sum of the exits' losses.

With `schedule="sdn"` the internal exits' weights ramp up as in SDN (Kaya et al., ICML 2019):
w_t(epoch) = min(C_t, 0.01 + epoch * C_t / E) with C_t spread evenly from 0.15 to 0.90 over the
internal exits, and weight 1 for the final exit. `epoch` counts from 1 as in the SDN code, so the last
epoch trains with the full C_t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from anytime.errors import ConfigError
from anytime.training.base import MethodOptions, TrainingContext
from anytime.training.methods.stepwise import StepwiseMethod


@dataclass(frozen=True)
class JointOptions(MethodOptions):
    weights: tuple[float, ...] | None = None  # fixed per-exit weights (default: all 1)
    schedule: Literal["constant", "sdn"] = "constant"
    sdn_min: float = 0.15  # C of the first internal exit
    sdn_max: float = 0.90  # C of the last internal exit

    def __post_init__(self) -> None:
        if self.weights is not None and (not self.weights or any(not w >= 0 for w in self.weights)):
            raise ConfigError(f"joint weights={self.weights!r}: give one weight >= 0 per exit, e.g. weights=1,1,1,1")
        if self.schedule not in ("constant", "sdn"):
            raise ConfigError(f"joint schedule={self.schedule!r}: choose 'constant' or 'sdn'")
        if self.schedule == "sdn" and self.weights is not None:
            raise ConfigError("joint: 'weights' and schedule=sdn exclude each other; give one of them")
        if not 0 < self.sdn_min <= self.sdn_max:
            raise ConfigError(f"joint sdn_min={self.sdn_min}, sdn_max={self.sdn_max}: need 0 < sdn_min <= sdn_max")


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
        self.epochs = ctx.epochs

    def exit_weights(self, epoch: int) -> list[float]:
        T = self.num_exits
        if self.options.schedule == "sdn":
            caps = np.linspace(self.options.sdn_min, self.options.sdn_max, T - 1) if T > 1 else []
            ramp = [min(float(c), 0.01 + (epoch + 1) * float(c) / self.epochs) for c in caps]  # 1-based epoch
            return ramp + [1.0]
        if self.options.weights is not None:
            return [float(v) for v in self.options.weights]
        return [1.0] * T

    def backward(self, ctx: TrainingContext, losses: list[torch.Tensor], epoch: int) -> None:
        weights = self.exit_weights(epoch)
        total = sum(w * loss for w, loss in zip(weights, losses))
        total.backward()  # type: ignore[union-attr]
