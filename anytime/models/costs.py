"""Exact per-exit cost and parameter accounting.

Costs are cumulative and per image: the cost of exit k is everything executed to reach it under real
early exit, i.e. stages 1..k, backbone blocks and heads alike (earlier heads run too). Two conventions:

- ``"macs"``: multiply-accumulates of convolutions and linear layers, as counted by PyTorch's own
  ``torch.utils.flop_counter.FlopCounterMode`` (which reports 2 FLOPs per MAC).
- ``"msdnet"``: the convention of the published MSDNet numbers (its reference ``op_counter.py``):
  conv MACs, 1 op per ReLU output element, 1 op per pooling-window element, weight + bias elements for a
  linear layer; normalisation is free.

Each stage is run on a batch of one image, in eval mode and without gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from anytime.errors import ConfigError
from anytime.models.base import MultiExitNetwork, State, as_hw

log = logging.getLogger(__name__)

CONVENTIONS = ("macs", "msdnet")


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _msdnet_ops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Ops of one leaf module under the MSDNet convention (0 for modules it treats as free)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_out = module.in_channels * kh * kw // module.groups
        return per_out * out.numel()
    if isinstance(module, nn.Linear):
        return (module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)) * inp.shape[0]
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish)):
        return inp.numel()
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        kh, kw = _pair(module.kernel_size)
        return out.numel() * kh * kw
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return inp.numel()
    return 0


def _stage_inputs(model: MultiExitNetwork, image_size: int | tuple[int, int] | None) -> State:
    h, w = as_hw(image_size) if image_size is not None else model.spec.image_size
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return (torch.zeros(1, model.spec.in_channels, h, w, device=device),)


def _per_stage(
    model: MultiExitNetwork, image_size, measure: Callable[[nn.Module, State], tuple[State, int]]
) -> list[int]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            state = _stage_inputs(model, image_size)
            costs = []
            for stage in model.stages:
                state, cost = measure(stage, state)
                costs.append(int(cost))
    except RuntimeError as exc:
        raise ConfigError(
            f"cannot run {model.spec.arch} on a {model.spec.in_channels}x{image_size or model.spec.image_size} "
            f"input to count its cost: {exc}. Use the image size the model was built for."
        ) from exc
    finally:
        model.train(was_training)
    return costs


def _measure_macs(stage: nn.Module, state: State) -> tuple[State, int]:
    with FlopCounterMode(display=False) as counter:
        state, _ = stage(state)
    return state, counter.get_total_flops() // 2


def _measure_msdnet(stage: nn.Module, state: State) -> tuple[State, int]:
    total = 0

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        nonlocal total
        total += _msdnet_ops(module, args[0], out)

    leaves = [m for m in stage.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        state, _ = stage(state)
    finally:
        for h in handles:
            h.remove()
    return state, total


def stage_costs(
    model: MultiExitNetwork, convention: str = "macs", image_size: int | tuple[int, int] | None = None
) -> list[int]:
    """Cost of each stage on its own (not cumulative), per image."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"unknown cost convention {convention!r}; use one of {', '.join(CONVENTIONS)}")
    measure = _measure_macs if convention == "macs" else _measure_msdnet
    return _per_stage(model, image_size, measure)


def _cumulative(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def exit_costs(
    model: MultiExitNetwork, convention: str = "macs", image_size: int | tuple[int, int] | None = None
) -> list[int]:
    """Cumulative cost per image of reaching each exit (stages and heads 1..k), in `convention`."""
    return _cumulative(stage_costs(model, convention, image_size))


def exit_params(model: MultiExitNetwork) -> list[int]:
    """Cumulative parameter count of stages 1..k (all the weights needed to answer at exit k)."""
    return _cumulative([sum(p.numel() for p in stage.parameters()) for stage in model.stages])


def cost_table(model: MultiExitNetwork, image_size: int | tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """One row per exit: {"exit" (1-based), "cost": {"macs", "msdnet"}, "params", "fraction"}.

    `fraction` is the exit's MAC cost divided by the last exit's (the share of the full network).
    """
    costs = {c: exit_costs(model, c, image_size) for c in CONVENTIONS}
    params = exit_params(model)
    full = costs["macs"][-1] or 1
    return [
        {
            "exit": k + 1,
            "cost": {c: costs[c][k] for c in CONVENTIONS},
            "params": params[k],
            "fraction": costs["macs"][k] / full,
        }
        for k in range(model.num_exits)
    ]
