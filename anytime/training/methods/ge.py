"""Gradient equilibrium (Li et al., "Improved Techniques for Training Adaptive Deep Networks", ICCV 2019).

GE rescales the gradient flowing back into the backbone so that a block's gradient is the *average*
of the contributions of the exits that reach it, not their sum: deep blocks reached by one exit and
early blocks reached by all exits then receive gradients of the same magnitude, and no single exit
dominates. The reference implementation (IMTA) inserts gradient-rescale nodes after each block (×1/(n−i)
towards head i, ×(n−i−1) onwards); multiplied out along a chain of stages, exit t's gradient on a
parameter of block j is scaled by 1/(number of exits reaching block j). This file applies that factor
per parameter from the exits' routes, so it works for any `MultiExitNetwork` without editing its
forward: backward the plain sum once, then divide each parameter's gradient by its number of owner
exits. Heads (one owner) keep their full gradient. (IMTA's MSDNet rescales only the coarsest-scale
features, so its factors on paths through finer scales differ slightly from this per-parameter rule.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anytime.training.base import MethodOptions, TrainingContext
from anytime.training.methods.stepwise import StepwiseMethod


@dataclass(frozen=True)
class GEOptions(MethodOptions):
    pass


class GradientEquilibrium(StepwiseMethod):
    name = "ge"
    Options = GEOptions

    def setup(self, ctx: TrainingContext) -> None:
        named = dict(ctx.model.named_parameters())
        # (parameter, 1 / number of exits whose route contains it), for shared parameters only.
        self.rescale: list[tuple[torch.Tensor, float]] = [
            (named[n], 1.0 / len(ctx.routes.owners(n))) for n in ctx.routes.names if ctx.routes.is_shared(n)
        ]

    def backward(self, ctx: TrainingContext, losses: list[torch.Tensor], epoch: int) -> None:
        torch.stack(losses).sum().backward()
        with torch.no_grad():
            for param, scale in self.rescale:
                if param.grad is not None:
                    param.grad.mul_(scale)
