"""The learning-rate schedule: a pure function of the epoch, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math

import torch

from anytime.training.config import TrainConfig


def scheduled_lr(config: TrainConfig, epoch: int) -> float:
    """The network's learning rate at `epoch` (0-based) under `config.schedule`."""
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1 + math.cos(math.pi * epoch / config.epochs))
    # multistep: divided at the first epoch >= fraction * epochs (epochs 150/225 of 300 in MSDNet).
    drops = sum(1 for m in config.milestones if epoch >= math.ceil(m * config.epochs))
    return config.lr * config.lr_gamma**drops


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
