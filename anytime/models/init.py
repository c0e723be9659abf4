"""Weight initialisation shared by the architectures (as in the MSDNet and SDN reference code)."""

from __future__ import annotations

import math

from torch import nn


def he_fan_out_init(m: nn.Module, linear_std: float | None = None) -> None:
    """He-normal (fan-out) convs, unit-gain BatchNorm, zero linear bias; `linear_std`: normal linear weights."""
    if isinstance(m, nn.Conv2d):
        n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        if linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
        nn.init.zeros_(m.bias)
