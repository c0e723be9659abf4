"""Tiny presets for fast tests (timm registers `test_*` models for the same reason)."""

from __future__ import annotations

import torch
from torch import nn

from anytime.models.base import ModelSpec, MultiExitNetwork, Stage, State, as_hw
from anytime.models.registry import register_model


class _ConvStage(Stage):
    def __init__(self, in_ch: int, out_ch: int, num_classes: int, stride: int, last: bool) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(out_ch, num_classes))
        self.last = last

    def forward(self, state: State) -> tuple[State, torch.Tensor]:
        h = self.block(state[0])
        return (() if self.last else (h,)), self.head(h)


class TestConvNet(MultiExitNetwork):
    """A plain chain of conv stages with one global-pool linear exit each."""

    def __init__(self, spec: ModelSpec, widths: tuple[int, ...] = (8, 16, 16)) -> None:
        super().__init__(spec)
        ch = spec.in_channels
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            self.stages.append(_ConvStage(ch, w, spec.num_classes, stride, last=i == len(widths) - 1))
            ch = w


@register_model
def test_convnet(num_classes: int = 10, in_channels: int = 3, image_size=32, widths=(8, 16, 16)):
    """3-exit toy network for tests; trains in seconds."""
    spec = ModelSpec("test-convnet", num_classes, in_channels, as_hw(image_size))
    return TestConvNet(spec, tuple(widths))
