"""MSDNet (Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image Classification", ICLR 2018).

Faithful to the reference implementation (gaohuang/MSDNet, PyTorch port kalviny/MSDNet-PyTorch): the
same layers, channel counts and pruning schedule, so the published per-exit costs and parameter counts
are reproduced exactly (tests/test_costs.py checks them). What differs is the packaging: the network
is a chain of anytime stages (backbone block k + classifier k), and the state handed from one stage to
the next is the tuple of multi-scale feature maps, finest first (fewer of them once scales are pruned).
One change in substance: the final layer builds only the scale the last classifier reads (see MSDLayer);
the published configurations never had more, so their numbers are unaffected.

Channel bookkeeping follows the reference: a width `n` is in "base units"; scale s carries
`n * gr_factor[s]` channels.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence

import torch
from torch import nn

from anytime.errors import ConfigError
from anytime.models.base import ModelSpec, MultiExitNetwork, Stage, State, as_hw
from anytime.models.init import he_fan_out_init
from anytime.models.registry import register_model

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[[], nn.Module]

_RELU: ActLayer = functools.partial(nn.ReLU, inplace=True)


def _conv_norm_act(
    in_ch: int, out_ch: int, kernel: int, stride: int, norm_layer: NormLayer, act_layer: ActLayer
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        norm_layer(out_ch),
        act_layer(),
    )


def _halve(size: int) -> int:
    # Output size of a 3x3/stride-2/padding-1 conv (and of the 7x7/2 stem and 3x3/2 max-pool): ceil(n/2).
    return (size + 1) // 2


# --------------------------------------------------------------------------------------------- blocks


class BottleneckConv(nn.Sequential):
    """Optional 1x1 bottleneck (width min(in, bn_width*out)) then a 3x3 conv, each with norm + act."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        bottleneck: bool,
        bn_width: int,
        norm_layer: NormLayer,
        act_layer: ActLayer,
    ) -> None:
        layers: list[nn.Module] = []
        inner = in_ch
        if bottleneck:
            inner = min(in_ch, bn_width * out_ch)
            layers += [nn.Conv2d(in_ch, inner, 1, bias=False), norm_layer(inner), act_layer()]
        layers += [nn.Conv2d(inner, out_ch, 3, stride=stride, padding=1, bias=False), norm_layer(out_ch), act_layer()]
        super().__init__(*layers)


class DenseUnit(nn.Module):
    """One scale of one MSDNet layer: concatenates its input with new features.

    The new features come from the same scale (3x3 conv) and, when `finer_ch` is given, half of them
    from the next finer scale (strided 3x3 conv): dense connectivity within and across scales.
    """

    def __init__(
        self,
        same_ch: int,
        finer_ch: int | None,
        growth: int,
        bottleneck: bool,
        bn_same: int,
        bn_finer: int,
        norm_layer: NormLayer,
        act_layer: ActLayer,
    ) -> None:
        super().__init__()
        if finer_ch is None:
            self.down = None
            self.same = BottleneckConv(same_ch, growth, 1, bottleneck, bn_same, norm_layer, act_layer)
        else:
            self.down = BottleneckConv(finer_ch, growth // 2, 2, bottleneck, bn_finer, norm_layer, act_layer)
            self.same = BottleneckConv(same_ch, growth // 2, 1, bottleneck, bn_same, norm_layer, act_layer)

    def forward(self, same: torch.Tensor, finer: torch.Tensor | None = None) -> torch.Tensor:
        if self.down is None:
            return torch.cat([same, self.same(same)], dim=1)
        return torch.cat([same, self.down(finer), self.same(same)], dim=1)


class MSDLayer(nn.Module):
    """One MSDNet layer over all remaining scales.

    It reads `in_scales` maps (the coarsest ones) and writes `out_scales` maps; when one scale is
    discarded (in_scales = out_scales + 1) the finest output scale also draws on the dropped map.
    With `coarsest_only` it writes just the coarsest map: the network's final layer feeds only the last
    classifier, so its finer outputs would be dead weight (the reference computes them when its
    pruning schedule leaves more than one scale at the end; none of the published configurations do).
    """

    def __init__(
        self,
        width: int,
        growth_rate: int,
        gr_factor: Sequence[int],
        bn_factor: Sequence[int],
        in_scales: int,
        out_scales: int,
        bottleneck: bool,
        norm_layer: NormLayer,
        act_layer: ActLayer,
        coarsest_only: bool = False,
    ) -> None:
        super().__init__()
        n_scales = len(gr_factor)
        discard = in_scales - out_scales
        if discard not in (0, 1):
            raise ConfigError(f"MSDNet layer would drop {discard} scales at once; only 0 or 1 is supported")
        offset = n_scales - out_scales
        self.units = nn.ModuleList()
        # (index of the same-scale input, index of the finer input or -1) in the incoming feature list.
        self.sources: list[tuple[int, int]] = []
        for j, s in enumerate(range(offset, n_scales)):
            if coarsest_only and s < n_scales - 1:
                continue
            has_finer = discard > 0 or j > 0
            same_idx = j + discard
            self.units.append(
                DenseUnit(
                    same_ch=width * gr_factor[s],
                    finer_ch=width * gr_factor[s - 1] if has_finer else None,
                    growth=growth_rate * gr_factor[s],
                    bottleneck=bottleneck,
                    bn_same=bn_factor[s],
                    bn_finer=bn_factor[s - 1] if has_finer else 1,
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                )
            )
            self.sources.append((same_idx, same_idx - 1 if has_finer else -1))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for unit, (same_idx, finer_idx) in zip(self.units, self.sources):
            out.append(unit(feats[same_idx], feats[finer_idx] if finer_idx >= 0 else None))
        return out


class Transition(nn.Module):
    """1x1 conv + norm + act per scale, compressing channels after a scale is pruned."""

    def __init__(self, in_ch: Sequence[int], out_ch: Sequence[int], norm_layer: NormLayer, act_layer: ActLayer) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_conv_norm_act(i, o, 1, 1, norm_layer, act_layer) for i, o in zip(in_ch, out_ch))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(f) for conv, f in zip(self.convs, feats)]


class MultiScaleStem(nn.Module):
    """First layer: the finest map from the image, then each coarser map by a strided 3x3 conv."""

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        stem: str,
        norm_layer: NormLayer,
        act_layer: ActLayer,
    ) -> None:
        super().__init__()
        if stem == "cifar":
            first: nn.Module = _conv_norm_act(in_channels, widths[0], 3, 1, norm_layer, act_layer)
        else:  # imagenet; the reference keeps the conv bias here
            first = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3),
                norm_layer(widths[0]),
                act_layer(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        self.scales = nn.ModuleList([first])
        for prev, w in zip(widths[:-1], widths[1:]):
            self.scales.append(_conv_norm_act(prev, w, 3, 2, norm_layer, act_layer))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for conv in self.scales:
            x = conv(x)
            feats.append(x)
        return feats


class Classifier(nn.Sequential):
    """Exit head on the coarsest scale: two 3x3/2 conv+norm+act, average pool, linear."""

    def __init__(
        self,
        in_ch: int,
        hidden: int,
        pool_hw: tuple[int, int],
        num_classes: int,
        norm_layer: NormLayer,
        act_layer: ActLayer,
    ) -> None:
        super().__init__(
            _conv_norm_act(in_ch, hidden, 3, 2, norm_layer, act_layer),
            _conv_norm_act(hidden, hidden, 3, 2, norm_layer, act_layer),
            # The reference's AvgPool2d(2) on the 2x2 map; sized to the map so any input size pools fully.
            nn.AvgPool2d(pool_hw),
            nn.Flatten(),
            nn.Linear(hidden, num_classes),
        )


class MSDNetStage(Stage):
    """Backbone block k (stem first, for k = 0) and classifier k."""

    def __init__(self, stem: MultiScaleStem | None, layers: list[nn.Module], head: Classifier, last: bool) -> None:
        super().__init__()
        self.stem = stem
        self.layers = nn.ModuleList(layers)
        self.head = head
        self.last = last

    def forward(self, state: State) -> tuple[State, torch.Tensor]:
        feats = self.stem(state[0]) if self.stem is not None else list(state)
        for layer in self.layers:
            feats = layer(feats)
        logits = self.head(feats[-1])
        return (() if self.last else tuple(feats)), logits


# -------------------------------------------------------------------------------------------- network


def block_steps(n_blocks: int, base: int, step: int, step_mode: str) -> list[int]:
    """Layers per block: `base` in the first, then `step` (even) or `step*i+1` (lin_grow)."""
    return [base] + [step if step_mode == "even" else step * i + 1 for i in range(1, n_blocks)]


def scales_of_layer(prune: str, layer: int, n_layers: int, n_scales: int) -> tuple[int, int]:
    """(input scales, output scales) of the 1-based `layer` under the reference's pruning schedules."""
    if prune == "max":
        interval = math.ceil(n_layers / n_scales)
        return (n_scales - max(0, layer - 2) // interval, n_scales - (layer - 1) // interval)
    return (min(n_scales, n_layers - layer + 2), min(n_scales, n_layers - layer + 1))


class MSDNet(MultiExitNetwork):
    """Multi-scale dense network with one exit per block."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        n_blocks: int,
        base: int,
        step: int,
        step_mode: str,
        n_channels: int,
        growth_rate: int,
        gr_factor: Sequence[int],
        bn_factor: Sequence[int],
        bottleneck: bool = True,
        prune: str = "max",
        reduction: float = 0.5,
        stem: str = "cifar",
        head_channels: int | None = 128,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = _RELU,
    ) -> None:
        super().__init__(spec)
        gr_factor, bn_factor = _int_list("gr_factor", gr_factor), _int_list("bn_factor", bn_factor)
        _check_config(
            spec,
            n_blocks,
            base,
            step,
            step_mode,
            n_channels,
            growth_rate,
            gr_factor,
            bn_factor,
            prune,
            reduction,
            stem,
            head_channels,
            bottleneck,
        )
        n_scales = len(gr_factor)
        steps = block_steps(n_blocks, base, step, step_mode)
        n_layers = sum(steps)

        h, w = spec.image_size
        if stem == "imagenet":
            h, w = _halve(_halve(h)), _halve(_halve(w))
        for _ in range(n_scales - 1):
            h, w = _halve(h), _halve(w)
        head_pool = (_halve(_halve(h)), _halve(_halve(w)))  # after the head's two strided convs

        width = n_channels
        layer = 0
        for b, n_block_layers in enumerate(steps):
            modules: list[nn.Module] = []
            for _ in range(n_block_layers):
                layer += 1
                in_scales, out_scales = scales_of_layer(prune, layer, n_layers, n_scales)
                final = layer == n_layers
                modules.append(
                    MSDLayer(
                        width,
                        growth_rate,
                        gr_factor,
                        bn_factor,
                        in_scales,
                        out_scales,
                        bottleneck,
                        norm_layer,
                        act_layer,
                        coarsest_only=final,
                    )
                )
                width += growth_rate
                if reduction > 0 and _has_transition(prune, layer, n_layers, in_scales, out_scales):
                    offset = n_scales - (1 if final else out_scales)
                    reduced = math.floor(reduction * width)
                    modules.append(
                        Transition(
                            [width * g for g in gr_factor[offset:]],
                            [reduced * g for g in gr_factor[offset:]],
                            norm_layer,
                            act_layer,
                        )
                    )
                    width = reduced
            head_in = width * gr_factor[-1]
            head = Classifier(head_in, head_channels or head_in, head_pool, spec.num_classes, norm_layer, act_layer)
            first = (
                MultiScaleStem(spec.in_channels, [n_channels * g for g in gr_factor], stem, norm_layer, act_layer)
                if b == 0
                else None
            )
            self.stages.append(MSDNetStage(first, modules, head, last=b == n_blocks - 1))
        self.steps = steps
        self.apply(he_fan_out_init)  # as the reference


def _int_list(name: str, value: Sequence[int]) -> list[int]:
    """A per-scale factor list; a string ("1,2,4", as `--model-option` passes non-JSON text) is refused."""
    wrong = ConfigError(f"{name} must be a list of integers, one per scale, e.g. {name}=[1,2,4]; got {value!r}")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise wrong
    try:
        return [operator.index(v) for v in value]
    except TypeError:
        raise wrong from None


def _has_transition(prune: str, layer: int, n_layers: int, in_scales: int, out_scales: int) -> bool:
    if prune == "max":
        return in_scales > out_scales
    return layer in (math.floor(n_layers / 3), math.floor(2 * n_layers / 3))


def _check_config(
    spec: ModelSpec,
    n_blocks: int,
    base: int,
    step: int,
    step_mode: str,
    n_channels: int,
    growth_rate: int,
    gr_factor: list[int],
    bn_factor: list[int],
    prune: str,
    reduction: float,
    stem: str,
    head_channels: int | None,
    bottleneck: bool,
) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    integers = {"n_blocks": n_blocks, "base": base, "step": step, "n_channels": n_channels, "growth_rate": growth_rate}
    if head_channels is not None:
        integers["head_channels"] = head_channels
    for key, value in integers.items():
        need(
            isinstance(value, int) and not isinstance(value, bool),
            f"{key} must be an integer, got {value!r}",
        )
    need(isinstance(bottleneck, bool), f"bottleneck must be true or false, got {bottleneck!r}")
    need(
        isinstance(reduction, (int, float)) and not isinstance(reduction, bool),
        f"reduction must be a number, got {reduction!r}",
    )

    need(spec.num_classes >= 1, f"num_classes must be >= 1, got {spec.num_classes}")
    need(spec.in_channels >= 1, f"in_channels must be >= 1, got {spec.in_channels}")
    need(min(spec.image_size) >= 1, f"image_size must be positive, got {spec.image_size}")
    need(n_blocks >= 1, f"n_blocks (number of exits) must be >= 1, got {n_blocks}")
    need(base >= 1 and step >= 1, f"base and step must be >= 1, got base={base}, step={step}")
    need(step_mode in ("even", "lin_grow"), f"step_mode must be 'even' or 'lin_grow', got {step_mode!r}")
    need(
        n_channels >= 1 and growth_rate >= 2,
        f"need n_channels >= 1 and growth_rate >= 2, got {n_channels}, {growth_rate}",
    )
    need(
        len(gr_factor) >= 1 and len(gr_factor) == len(bn_factor),
        f"gr_factor and bn_factor need one entry per scale, got {gr_factor} and {bn_factor}",
    )
    need(all(g >= 1 for g in gr_factor + bn_factor), f"gr_factor/bn_factor must be >= 1: {gr_factor}, {bn_factor}")
    # Scales after the first take half their new channels from the finer scale and half from their own.
    need(
        all(growth_rate * g % 2 == 0 for g in gr_factor[1:]),
        f"growth_rate * gr_factor must be even on every scale but the first (half of a scale's new channels "
        f"come from the finer scale), got growth_rate={growth_rate}, gr_factor={gr_factor}; use an even growth_rate",
    )
    need(prune in ("max", "min"), f"prune must be 'max' or 'min', got {prune!r}")
    need(0 <= reduction <= 1, f"reduction must be in [0, 1], got {reduction}")
    need(stem in ("cifar", "imagenet"), f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    need(head_channels is None or head_channels >= 1, f"head_channels must be >= 1 or None, got {head_channels}")


def _create_msdnet(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int | tuple[int, int],
    **config,
) -> MSDNet:
    spec = ModelSpec(arch, int(num_classes), int(in_channels), as_hw(image_size))
    return MSDNet(spec, **config)


# ------------------------------------------------------------------------------------------- presets

# The 7-exit CIFAR configuration of the paper, DR-MGF and most follow-ups.
_CIFAR_7 = dict(
    n_blocks=7,
    base=4,
    step=2,
    step_mode="even",
    n_channels=16,
    growth_rate=16,
    gr_factor=(1, 2, 4),
    bn_factor=(1, 2, 4),
    in_channels=3,
    image_size=32,
)
_IMAGENET = dict(
    n_blocks=5,
    step_mode="even",
    n_channels=32,
    growth_rate=16,
    gr_factor=(1, 2, 4, 4),
    bn_factor=(1, 2, 4, 4),
    stem="imagenet",
    head_channels=None,
    num_classes=1000,
    in_channels=3,
    image_size=224,
)
# Fashion-MNIST sized: 4 exits at about 22/52/87/100% of 2.3 M MACs, 50 k parameters. Small convs on
# 28x28 maps are overhead-bound on CPU, so it is kept narrow and without 1x1 bottlenecks: a training step
# at batch 64 takes about 0.1 s on 2 cores, i.e. 1.5 minutes per 60k-image epoch.
_TINY = dict(
    n_blocks=4,
    base=1,
    step=1,
    step_mode="even",
    n_channels=4,
    growth_rate=4,
    gr_factor=(1, 2, 4),
    bn_factor=(1, 2, 4),
    bottleneck=False,
    head_channels=16,
    num_classes=10,
    in_channels=1,
    image_size=28,
)


@register_model
def msdnet_cifar100(**kwargs) -> MSDNet:
    """MSDNet, 7 exits, CIFAR-100 (340.6 M published FLOPs at the last exit)."""
    return _create_msdnet("msdnet-cifar100", **{**_CIFAR_7, "num_classes": 100, **kwargs})


@register_model
def msdnet_cifar10(**kwargs) -> MSDNet:
    """MSDNet, 7 exits, CIFAR-10."""
    return _create_msdnet("msdnet-cifar10", **{**_CIFAR_7, "num_classes": 10, **kwargs})


@register_model
def msdnet_imagenet_step4(**kwargs) -> MSDNet:
    """MSDNet, 5 exits, ImageNet 224x224, base = step = 4."""
    return _create_msdnet("msdnet-imagenet-step4", **{**_IMAGENET, "base": 4, "step": 4, **kwargs})


@register_model
def msdnet_imagenet_step7(**kwargs) -> MSDNet:
    """MSDNet, 5 exits, ImageNet 224x224, base = step = 7."""
    return _create_msdnet("msdnet-imagenet-step7", **{**_IMAGENET, "base": 7, "step": 7, **kwargs})


@register_model
def msdnet_tiny(**kwargs) -> MSDNet:
    """Small MSDNet, 4 exits, 28x28 grey images (works at 32x32 too); the default Fashion-MNIST model."""
    return _create_msdnet("msdnet-tiny", **{**_TINY, **kwargs})
