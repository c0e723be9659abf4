"""Fold DR-MGF's gated reparameterisation into plain weights.

Folding replaces every gated shared conv weight V by the effective weight W_t that exit t sees; every
other parameter and buffer is copied unchanged. The result is the ordinary architecture (plain Conv2d,
BatchNorm, Linear weights), loadable with `load_state_dict(strict=True)` into a freshly built network of
the same preset, and it computes exactly what the gated forward for exit t computes.
"""

from __future__ import annotations

import copy

import torch

from anytime.models.base import MultiExitNetwork
from anytime.training.methods.drmgf.gates import RouteGates


@torch.no_grad()
def folded_state_dict(
    model: MultiExitNetwork, importance: RouteGates | None, exit_index: int
) -> dict[str, torch.Tensor]:
    """A plain state dict (fresh tensors) with exit `exit_index`'s gated weights folded in."""
    if not 0 <= exit_index < model.num_exits:
        raise ValueError(f"exit_index {exit_index} is outside 0..{model.num_exits - 1}")
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    if importance is not None:
        params = dict(model.named_parameters())
        for name, weight in importance.effective_weights(params, exit_index).items():
            state[name] = weight.detach().clone()
    return state


def fold_model(model: MultiExitNetwork, importance: RouteGates | None, exit_index: int) -> MultiExitNetwork:
    """A fresh plain network computing what the gated model computes for exit `exit_index`.

    `model` is left untouched. With `importance=None` (no dynamic routes) this is a plain copy.
    """
    folded = copy.deepcopy(model)
    folded.load_state_dict(folded_state_dict(model, importance, exit_index), strict=True)
    return folded
