"""Shallow-Deep Networks (Kaya et al., "Shallow-Deep Networks", ICML 2019).

Standard CNN backbones (VGG16-BN, ResNet-56, WRN-32-4, MobileNet) with internal classifiers (ICs) at the
positions of the reference code (yigitcankaya/Shallow-Deep-Networks, `network_architectures.py`), chosen
there to sit at roughly 15/30/45/60/75/90% of the backbone's cost.

Every backbone is written as a flat list of units (tensor -> tensor); stage k runs the units up to IC k
and IC k, the last stage runs the rest of the backbone and its original classifier. An IC reads exactly
the tensor the reference's IC reads; for ResNet that is the residual sum *before* the block's ReLU, so
here a ResNet block returns that sum and the next unit starts with the ReLU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from anytime.errors import ConfigError
from anytime.models.base import ModelSpec, MultiExitNetwork, Stage, State, as_hw
from anytime.models.init import he_fan_out_init
from anytime.models.registry import register_model

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[[], nn.Module]

# ------------------------------------------------------------------------------------ internal classifier


class MixedPool(nn.Module):
    """alpha * maxpool + (1 - alpha) * avgpool with a learned scalar alpha (random init, as the reference)."""

    def __init__(self, kernel: tuple[int, int]) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.rand(1))
        self.max_pool = nn.MaxPool2d(kernel)
        self.avg_pool = nn.AvgPool2d(kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.max_pool(x) + (1 - self.alpha) * self.avg_pool(x)


class InternalClassifier(nn.Module):
    """Mixed pooling down to about 4x4 (none when the map is already that small), then one linear layer."""

    def __init__(self, channels: int, hw: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        kernel = (max(1, hw[0] // 4), max(1, hw[1] // 4))
        if max(kernel) > 1:
            self.pool: MixedPool | None = MixedPool(kernel)
            hw = (hw[0] // kernel[0], hw[1] // kernel[1])
        else:
            self.pool = None
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(channels * hw[0] * hw[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        return self.linear(self.flatten(x))


# ------------------------------------------------------------------------------------------ backbone units


class ResidualBlock(nn.Module):
    """ResNet basic block returning the residual sum before its ReLU (applied by the next unit)."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, relu_input: bool, norm_layer: NormLayer, act_layer: ActLayer
    ) -> None:
        super().__init__()
        # The block after another block activates the previous block's sum; the first block follows the stem.
        self.act_in = act_layer() if relu_input else None
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            norm_layer(out_ch),
            act_layer(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            norm_layer(out_ch),
        )
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), norm_layer(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_in is not None:
            x = self.act_in(x)
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.body(x) + skip


class WideBlock(nn.Module):
    """Pre-activation wide ResNet block (BN-ReLU-conv-dropout-BN-ReLU-conv, biased convs as the reference)."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, dropout: float, norm_layer: NormLayer, act_layer: ActLayer
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [norm_layer(in_ch), act_layer(), nn.Conv2d(in_ch, out_ch, 3, padding=1)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [norm_layer(out_ch), act_layer(), nn.Conv2d(out_ch, out_ch, 3, stride=stride, padding=1)]
        self.body = nn.Sequential(*layers)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.body(x) + skip


def _conv_unit(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int,
    norm_layer: NormLayer,
    act_layer: ActLayer,
    bias: bool = False,
    groups: int = 1,
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=bias, groups=groups),
        norm_layer(out_ch),
        act_layer(),
    )


# ------------------------------------------------------------------------------------------------ network


class SDNStage(Stage):
    """Backbone units up to an IC, and that IC (or, last, the rest of the backbone and its classifier)."""

    def __init__(self, units: Sequence[nn.Module], head: nn.Module, last: bool) -> None:
        super().__init__()
        self.units = nn.Sequential(*units)
        self.head = head
        self.last = last

    def forward(self, state: State) -> tuple[State, torch.Tensor]:
        x = self.units(state[0])
        return (() if self.last else (x,)), self.head(x)


class SDN(MultiExitNetwork):
    """A backbone (list of units) cut after the units in `ic_after`, with an IC at each cut."""

    # Kaya et al. train the internal classifiers with a ramped weight; with every exit at weight 1 the
    # deep SDN backbones diverge at the paper's lr 0.1 (measured: NaN within 8 steps for resnet56).
    default_exit_weights = "sdn"

    def __init__(
        self,
        spec: ModelSpec,
        units: Sequence[nn.Module],
        ic_after: Sequence[int],
        end_head: nn.Module,
        init: Callable[[nn.Module], None] | None = None,
    ) -> None:
        super().__init__(spec)
        if sorted(set(ic_after)) != list(ic_after) or not ic_after or ic_after[0] < 0 or ic_after[-1] >= len(units) - 1:
            raise ConfigError(
                f"IC positions must be increasing unit indices below {len(units) - 1}, got {list(ic_after)}"
            )
        shapes = _unit_output_shapes(spec, units)
        start = 0
        for i in ic_after:
            c, h, w = shapes[i]
            ic = InternalClassifier(c, (h, w), spec.num_classes)
            self.stages.append(SDNStage(units[start : i + 1], ic, last=False))
            start = i + 1
        self.stages.append(SDNStage(units[start:], end_head, last=True))
        if init is not None:
            self.apply(init)


def _unit_output_shapes(spec: ModelSpec, units: Sequence[nn.Module]) -> list[tuple[int, int, int]]:
    """(C, H, W) after each unit, from one dry run on a single zero image."""
    x = torch.zeros(1, spec.in_channels, *spec.image_size)
    shapes = []
    try:
        with torch.no_grad():
            for u in units:
                u.eval()
                x = u(x)
                u.train()
                shapes.append(tuple(x.shape[1:]))
    except RuntimeError as exc:
        raise ConfigError(
            f"image_size {spec.image_size} is too small for this backbone ({exc}); use a larger image size "
            "(the SDN presets are built for 32x32)"
        ) from exc
    return shapes  # type: ignore[return-value]


def _check_spec(spec: ModelSpec) -> None:
    if spec.num_classes < 1 or spec.in_channels < 1 or min(spec.image_size) < 1:
        raise ConfigError(
            f"num_classes, in_channels and image_size must be positive, got {spec.num_classes}, "
            f"{spec.in_channels}, {spec.image_size}"
        )


def _vgg_init(m: nn.Module) -> None:
    he_fan_out_init(m, linear_std=0.01)
    if isinstance(m, nn.Conv2d) and m.bias is not None:
        nn.init.zeros_(m.bias)


def _resnet_init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------ builders


def sdn_vgg(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int | tuple[int, int],
    channels: Sequence[int],
    pool_after: Sequence[int],
    ic_after: Sequence[int],
    fc_widths: Sequence[int] = (512, 512),
    dropout: float = 0.5,
    norm_layer: NormLayer = nn.BatchNorm2d,
    act_layer: ActLayer = nn.ReLU,
) -> SDN:
    """VGG with batch norm: 3x3 conv+BN+ReLU units, 2x2 max-pool after the units in `pool_after`."""
    spec = ModelSpec(arch, int(num_classes), int(in_channels), as_hw(image_size))
    _check_spec(spec)
    units: list[nn.Module] = []
    ch, (h, w) = spec.in_channels, spec.image_size
    for i, out_ch in enumerate(channels):
        unit = _conv_unit(ch, out_ch, 3, 1, norm_layer, act_layer, bias=True)
        if i in pool_after:
            unit.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        units.append(unit)
        ch = out_ch
    if min(h, w) < 1:
        raise ConfigError(f"image_size {spec.image_size} is too small for VGG's {len(pool_after)} max-pools; use >= 32")
    # As the reference: Linear-ReLU-Dropout for all but the last width, then Linear-Dropout-Linear.
    fc: list[nn.Module] = [nn.Flatten()]
    width = ch * h * w
    for out_w in fc_widths[:-1]:
        fc += [nn.Linear(width, out_w), act_layer()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        width = out_w
    fc.append(nn.Linear(width, fc_widths[-1]))
    fc += [nn.Dropout(dropout)] if dropout > 0 else []
    fc.append(nn.Linear(fc_widths[-1], spec.num_classes))
    return SDN(spec, units, ic_after, nn.Sequential(*fc), init=_vgg_init)


def sdn_resnet(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int | tuple[int, int],
    blocks: Sequence[int],
    widths: Sequence[int],
    ic_after: Sequence[tuple[int, int]],
    stem_stride: int = 1,
    norm_layer: NormLayer = nn.BatchNorm2d,
    act_layer: ActLayer = nn.ReLU,
) -> SDN:
    """CIFAR ResNet (basic blocks); `ic_after` holds 1-based (stage, block) pairs."""
    spec = ModelSpec(arch, int(num_classes), int(in_channels), as_hw(image_size))
    _check_spec(spec)
    units: list[nn.Module] = [_conv_unit(spec.in_channels, widths[0], 3, stem_stride, norm_layer, act_layer)]
    position: dict[tuple[int, int], int] = {}
    ch = widths[0]
    for s, (n, width) in enumerate(zip(blocks, widths), start=1):
        for b in range(1, n + 1):
            stride = 2 if s > 1 and b == 1 else 1
            units.append(
                ResidualBlock(ch, width, stride, relu_input=len(units) > 1, norm_layer=norm_layer, act_layer=act_layer)
            )
            position[(s, b)] = len(units) - 1
            ch = width
    head = nn.Sequential(act_layer(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, spec.num_classes))
    return SDN(spec, units, _positions(position, ic_after), head, init=_resnet_init)


def sdn_wide_resnet(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int | tuple[int, int],
    blocks: Sequence[int],
    widen_factor: int,
    ic_after: Sequence[tuple[int, int]],
    dropout: float = 0.3,
    stem_stride: int = 1,
    norm_layer: NormLayer = nn.BatchNorm2d,
    act_layer: ActLayer = nn.ReLU,
) -> SDN:
    """Wide ResNet (pre-activation blocks, widths 16k/32k/64k); `ic_after` holds 1-based (stage, block)."""
    spec = ModelSpec(arch, int(num_classes), int(in_channels), as_hw(image_size))
    _check_spec(spec)
    units: list[nn.Module] = [nn.Conv2d(spec.in_channels, 16, 3, stride=stem_stride, padding=1)]
    position: dict[tuple[int, int], int] = {}
    ch = 16
    for s, (n, base) in enumerate(zip(blocks, (16, 32, 64)), start=1):
        width = base * widen_factor
        for b in range(1, n + 1):
            stride = 2 if s > 1 and b == 1 else 1
            units.append(WideBlock(ch, width, stride, dropout, norm_layer, act_layer))
            position[(s, b)] = len(units) - 1
            ch = width
    head = nn.Sequential(
        norm_layer(ch), act_layer(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, spec.num_classes)
    )
    return SDN(spec, units, _positions(position, ic_after), head, init=he_fan_out_init)


def sdn_mobilenet_v1(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int | tuple[int, int],
    cfg: Sequence[int | tuple[int, int]],
    ic_after: Sequence[int],
    stem_width: int = 32,
    norm_layer: NormLayer = nn.BatchNorm2d,
    act_layer: ActLayer = nn.ReLU,
) -> SDN:
    """MobileNet (v1): depthwise 3x3 + pointwise 1x1 units; cfg entries are width or (width, stride);
    `ic_after` holds 1-based block numbers."""
    spec = ModelSpec(arch, int(num_classes), int(in_channels), as_hw(image_size))
    _check_spec(spec)
    units: list[nn.Module] = [_conv_unit(spec.in_channels, stem_width, 3, 1, norm_layer, act_layer)]
    ch = stem_width
    for entry in cfg:
        width, stride = (entry, 1) if isinstance(entry, int) else (int(entry[0]), int(entry[1]))
        units.append(
            nn.Sequential(
                *_conv_unit(ch, ch, 3, stride, norm_layer, act_layer, groups=ch),
                *_conv_unit(ch, width, 1, 1, norm_layer, act_layer),
            )
        )
        ch = width
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, spec.num_classes))
    return SDN(spec, units, list(ic_after), head)  # the reference keeps PyTorch's default init here


def _positions(position: dict[tuple[int, int], int], ic_after: Sequence[tuple[int, int]]) -> list[int]:
    try:
        return [position[(int(s), int(b))] for s, b in ic_after]
    except KeyError as exc:
        raise ConfigError(f"IC position (stage, block) {exc.args[0]} does not exist in this backbone") from exc


# ------------------------------------------------------------------------------------------------- presets

_CIFAR = dict(num_classes=10, in_channels=3, image_size=32)
_VGG16 = dict(
    channels=(64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512),
    pool_after=(1, 3, 6, 9, 12),
    ic_after=(1, 3, 5, 6, 8, 9),
)  # 0-based: after conv 2, 4, 6, 7, 9, 10
_RESNET56 = dict(blocks=(9, 9, 9), widths=(16, 32, 64), ic_after=((1, 4), (1, 8), (2, 3), (2, 7), (3, 2), (3, 6)))
_WRN32_4 = dict(blocks=(5, 5, 5), widen_factor=4, ic_after=((1, 3), (1, 5), (2, 2), (2, 4), (3, 1), (3, 3)))
# CPU-sized member of the family for 28x28 grey images: a narrow ResNet-14 (widths 8/16/32) with one IC
# after the first block of each stage (4 exits, 5.1 M MACs, 64 k parameters; about msdnet-tiny's
# training time per image on one CPU thread).
_TINY = dict(
    num_classes=10,
    in_channels=1,
    image_size=28,
    blocks=(2, 2, 2),
    widths=(8, 16, 32),
    ic_after=((1, 1), (2, 1), (3, 1)),
)
# Unit 0 is the stem, so unit i is MobileNet block i (1-based); the reference attaches 5 ICs.
_MOBILENET = dict(
    cfg=(64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024),
    ic_after=(3, 5, 7, 9, 12),
)


@register_model
def sdn_vgg16(**kwargs) -> SDN:
    """SDN on VGG16-BN, CIFAR 32x32: ICs after conv layers 2, 4, 6, 7, 9, 10 (7 exits)."""
    return sdn_vgg("sdn-vgg16", **{**_CIFAR, **_VGG16, **kwargs})


@register_model
def sdn_resnet56(**kwargs) -> SDN:
    """SDN on ResNet-56, CIFAR 32x32: ICs after blocks 4, 8 | 3, 7 | 2, 6 of the three stages (7 exits)."""
    return sdn_resnet("sdn-resnet56", **{**_CIFAR, **_RESNET56, **kwargs})


@register_model
def sdn_wrn32_4(**kwargs) -> SDN:
    """SDN on Wide-ResNet-32-4, CIFAR 32x32: ICs after blocks 3, 5 | 2, 4 | 1, 3 (7 exits)."""
    return sdn_wide_resnet("sdn-wrn32-4", **{**_CIFAR, **_WRN32_4, **kwargs})


@register_model
def sdn_mobilenet(**kwargs) -> SDN:
    """SDN on MobileNet (v1), CIFAR 32x32: ICs after blocks 3, 5, 7, 9, 12 as in the reference (6 exits)."""
    return sdn_mobilenet_v1("sdn-mobilenet", **{**_CIFAR, **_MOBILENET, **kwargs})


@register_model
def sdn_tiny(**kwargs) -> SDN:
    """Small ResNet-SDN, 4 exits, 28x28 grey images (works at 32x32 too): ICs after the first block of each stage."""
    return sdn_resnet("sdn-tiny", **{**_TINY, **kwargs})
