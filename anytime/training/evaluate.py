"""Per-exit top-1 accuracy of a multi-exit model; under torchrun each rank counts its own shard."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from anytime.training import distributed as ddp


@torch.no_grad()
def exit_accuracy(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_exits: int,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> list[float]:
    """Top-1 accuracy of every exit over `batches` (summed over ranks); [] when there is nothing to count."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(num_exits, dtype=torch.float64)
    seen = 0
    try:
        for x, y in batches:
            x, y = x.to(device, memory_format=memory_format), y.to(device)
            for t, logits in enumerate(model(x)):
                correct[t] += (logits.argmax(1) == y).sum().item()
            seen += int(y.shape[0])
    finally:
        model.train(was_training)
    totals = ddp.all_reduce_sum(torch.cat([correct, torch.tensor([float(seen)], dtype=torch.float64)]))
    n = totals[-1].item()
    if not n:
        return []  # no validation hold-out (--val-size 0)
    return [float(c / n) for c in totals[:-1].tolist()]
