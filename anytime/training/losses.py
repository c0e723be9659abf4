"""Per-exit losses: cross-entropy, optionally with distillation from the last exit.

Distillation follows Phuong & Lampert, "Distillation-based training for multi-exit architectures"
(ICCV 2019): every earlier exit also matches the softened prediction of the last exit, whose logits act
as a detached teacher, so distillation never pulls the last exit towards the early ones:

    loss_t = (1 - w) * CE(z_t, y) + w * tau^2 * KL(softmax(z_T / tau) || softmax(z_t / tau))   (t < T)
    loss_T = CE(z_T, y)

The tau^2 factor keeps the soft-target gradients on the scale of the hard-target ones (Hinton et al.).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
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


EXIT_WEIGHTINGS = ("auto", "constant", "sdn")
SDN_CAPS = (0.15, 0.90)  # C of the first and of the last internal exit (Kaya et al., ICML 2019)


def exit_weights(kind: str, num_exits: int, epoch: int, epochs: int) -> list[float]:
    """Per-exit loss weights at `epoch` (0-based).

    "constant": all 1. "sdn": the SDN ramp, w_t = min(C_t, 0.01 + (epoch + 1) * C_t / epochs) with C_t
    spread evenly from 0.15 to 0.90 over the internal exits and weight 1 for the final exit; the epoch
    counts from 1 as in the SDN code, so the last epoch trains with the full C_t.
    """
    if kind == "constant":
        return [1.0] * num_exits
    if kind != "sdn":
        raise ValueError(f"unknown exit weighting {kind!r}")
    caps: Sequence[float] = np.linspace(*SDN_CAPS, num_exits - 1).tolist() if num_exits > 1 else []
    return [min(float(c), 0.01 + (epoch + 1) * float(c) / epochs) for c in caps] + [1.0]
