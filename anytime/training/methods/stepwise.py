"""Shared plumbing of methods that make one optimiser step per mini-batch from the per-exit losses.

A subclass only says how the list of per-exit losses becomes `.grad` on the parameters (`backward`).
"""

from __future__ import annotations

from typing import Any

import torch

from anytime.training.base import TrainingContext, TrainingMethod


class StepwiseMethod(TrainingMethod):
    """One pass over the training set per epoch: forward, per-exit losses, backward, sync, step."""

    phase = "train"

    def backward(self, ctx: TrainingContext, losses: list[torch.Tensor], epoch: int) -> None:
        """Turn the per-exit losses into parameter gradients (accumulated into `.grad`).

        Under fp16 the losses arrive multiplied by `ctx.precision.loss_scale`; a method whose gradients are
        not linear in the losses must divide it out before combining them (see `methods.jd`)."""
        raise NotImplementedError

    def train_epoch(self, ctx: TrainingContext, epoch: int) -> dict[str, float]:
        model, precision = ctx.model, ctx.precision
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        total_loss = 0.0
        exit_sums = [0.0] * ctx.num_exits
        seen = 0
        steps = 0
        for step, (x, y) in enumerate(ctx.train_batches(epoch, self.phase)):
            ctx.optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                outputs = model(x)
                losses = ctx.exit_losses(outputs, y, epoch)
            # One host sync per step for all exits; name the exit only when something is wrong.
            values = torch.stack([loss.detach() for loss in losses]).tolist()
            for t, value in enumerate(values):
                if value != value or value in (float("inf"), float("-inf")):
                    ctx.check_finite(losses[t], epoch, step, t)
            self.backward(ctx, [precision.scale(loss) for loss in losses], epoch)
            ctx.sync_gradients(p for p in params if p.grad is not None)
            precision.step(ctx.optimizer)
            n = int(y.shape[0])
            step_loss = float(sum(values))
            ctx.log_step(step_loss, n)
            total_loss += step_loss * n
            for t, value in enumerate(values):
                exit_sums[t] += value * n
            seen += n
            steps += 1
        ctx.sync_buffers(model)
        metrics: dict[str, float] = {"loss": total_loss / max(seen, 1), "steps": float(steps)}
        for t, s in enumerate(exit_sums):
            metrics[f"loss_exit_{t}"] = s / max(seen, 1)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {}
