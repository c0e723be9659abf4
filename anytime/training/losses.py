"""Per-exit losses: cross-entropy, optionally with distillation from the last exit.

Distillation follows Phuong & Lampert, "Distillation-based training for multi-exit architectures"
(ICCV 2019): every earlier exit also matches the softened prediction of the last exit, whose logits act
as a detached teacher, so distillation never pulls the last exit towards the early ones:

    loss_t = (1 - w) * CE(z_t, y) + w * tau^2 * KL(softmax(z_T / tau) || softmax(z_t / tau))   (t < T)
    loss_T = CE(z_T, y)

The tau^2 factor keeps the soft-target gradients on the scale of the hard-target ones (Hinton et al.).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ExitLoss:
    kd_weight: float = 0.0
    kd_temperature: float = 4.0

    def __call__(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> list[torch.Tensor]:
        ce = [F.cross_entropy(logits, targets) for logits in outputs]
        if self.kd_weight <= 0 or len(outputs) < 2:
            return ce
        tau = self.kd_temperature
        teacher = F.softmax(outputs[-1].detach().float() / tau, dim=1)
        losses = []
        for logits, hard in zip(outputs[:-1], ce[:-1]):
            soft = F.kl_div(F.log_softmax(logits.float() / tau, dim=1), teacher, reduction="batchmean")
            losses.append((1 - self.kd_weight) * hard + self.kd_weight * tau * tau * soft)
        losses.append(ce[-1])
        return losses
