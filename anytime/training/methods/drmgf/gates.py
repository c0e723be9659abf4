"""DR-MGF's dynamic routes: a gated reparameterisation of the shared conv weights.

For a shared conv weight V ([O, I/groups, k, k]) every exit t on the layer's route owns importance
variables M_t ([O, I/groups]). Exit t sees the effective weight

    N_t[o,i] = |M_t[o,i]| / (1 + 1e-4 * sum_i' |M_t[o,i']|) ** 0.75      (lateral normalisation)
    G_t      = (kappa * N_t + sum_{j != t} N_j) / (kappa + R - 1)          (gate; R exits on the route)
    W_t      = G_t * V / ||V||                                             (norm over each k x k slice)

so V carries the direction and the gate the magnitude. The gated forward never copies the model: the
effective weights are handed to `torch.func.functional_call` as overrides.

Choices beyond the paper (see docs/drmgf.md):
- Only convs whose kernel has more than one element are gated. For a 1x1 kernel the slice direction is
  just the sign of V, whose gradient is zero, so V could never change sign; those convs train plainly.
- Grouped and depthwise convs get one importance variable per [o, i/groups] connection, i.e. per
  kernel slice of the stored weight; lateral normalisation runs over the filter's own input channels.
- M_t is initialised to c * ||V[o,i]|| with the per-filter constant c solving c = (1 + 1e-4 c S)^0.75
  (S = sum of the filter's slice norms), so the gate equals ||V|| exactly and the reparameterised
  network starts as the identity. The paper initialises M_t to ||V||, which is the identity only up to
  the lateral normalisation factor (1 + 1e-4 S)^-0.75; c is 1 + O(1e-4 S).
- In exit t's pass only M_t is trained: the other exits' M_j enter G_t as constants.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from anytime.errors import TrainingError
from anytime.training.base import Routes

LATERAL_ALPHA = 1e-4
LATERAL_BETA = 0.75
NORM_EPS = 1e-12


def slice_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of every kernel slice: [O, I/groups, *kernel] -> [O, I/groups]."""
    return weight.flatten(2).norm(dim=2)


def lateral_normalise(importance: torch.Tensor) -> torch.Tensor:
    """N[o,i] = |M[o,i]| / (1 + 1e-4 * sum_i' |M[o,i']|) ** 0.75 over the last (input-channel) axis.

    Works on one exit's [O, I/groups] or on all exits' stacked [R, O, I/groups] at once.
    """
    magnitude = importance.abs()
    return magnitude / (1.0 + LATERAL_ALPHA * magnitude.sum(dim=-1, keepdim=True)) ** LATERAL_BETA


def combine_gate(normalised: torch.Tensor, position: int, kappa: float) -> torch.Tensor:
    """G = (kappa * N[position] + sum of the other rows) / (kappa + R - 1), N stacked as [R, ...]."""
    # kappa*N_t + sum_{j!=t} N_j == (kappa-1)*N_t + sum_j N_j
    total = normalised.sum(dim=0)
    return ((kappa - 1.0) * normalised[position] + total) / (kappa + normalised.shape[0] - 1.0)


def _expand_like(per_slice: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return per_slice.reshape(per_slice.shape + (1,) * (weight.dim() - per_slice.dim()))


def gated_weight(weight: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """W = G * V / ||V|| per kernel slice (eps 1e-12 guards all-zero slices)."""
    scale = gate / slice_norms(weight).clamp_min(NORM_EPS)
    return weight * _expand_like(scale, weight)


def identity_importance(weight: torch.Tensor) -> torch.Tensor:
    """Importance values whose lateral normalisation equals the slice norms of `weight` exactly."""
    norms = slice_norms(weight.detach()).double()
    scaled_sum = LATERAL_ALPHA * norms.sum(dim=1, keepdim=True)
    # Fixed point of c = (1 + a c)^0.75; a contraction near the solution, c = 1 + O(a).
    c = torch.ones_like(scaled_sum)
    for _ in range(100):
        c = (1.0 + scaled_sum * c) ** LATERAL_BETA
    return (c * norms).to(weight.dtype)


@dataclass(frozen=True)
class GatedLayer:
    """One gated conv: its weight's parameter name and the exits (0-based, ascending) on its route."""

    name: str
    exits: tuple[int, ...]
    shape: tuple[int, int]  # [out_channels, in_channels / groups]


def conv_weights(model: nn.Module) -> dict[str, nn.modules.conv._ConvNd]:
    """Parameter name of every conv weight -> its module."""
    return {
        f"{prefix}.weight" if prefix else "weight": module
        for prefix, module in model.named_modules()
        if isinstance(module, nn.modules.conv._ConvNd)
    }


def find_gated_layers(model: nn.Module, routes: Routes) -> list[GatedLayer]:
    """The shared convs with a kernel of more than one element, in parameter order."""
    convs = conv_weights(model)
    layers = []
    for name in routes.names:
        module = convs.get(name)
        if module is None or not routes.is_shared(name):
            continue
        if module.weight.shape[2:].numel() <= 1:
            continue  # 1x1: see module docstring
        out_ch, in_per_group = module.weight.shape[:2]
        layers.append(GatedLayer(name, tuple(routes.owners(name)), (int(out_ch), int(in_per_group))))
    return layers


class RouteGates:
    """The importance variables of all gated layers, and the gated forward built from them."""

    def __init__(self, layers: list[GatedLayer], importance: dict[str, list[torch.Tensor]], kappa: float) -> None:
        self.layers = layers
        self.importance = importance  # layer name -> one leaf tensor per exit on its route (route order)
        self.kappa = float(kappa)
        self._by_name = {layer.name: layer for layer in layers}

    @classmethod
    def from_model(cls, model: nn.Module, routes: Routes, kappa: float) -> "RouteGates":
        params = dict(model.named_parameters())
        layers = find_gated_layers(model, routes)
        importance = {}
        for layer in layers:
            init = identity_importance(params[layer.name])
            importance[layer.name] = [init.clone().requires_grad_(True) for _ in layer.exits]
        return cls(layers, importance, kappa)

    @torch.no_grad()
    def reset_to_identity(self, model: nn.Module) -> None:
        """Every exit's importance set, in place, so that its gated network equals `model`'s plain one."""
        params = dict(model.named_parameters())
        for layer in self.layers:
            identity = identity_importance(params[layer.name])
            for m in self.importance[layer.name]:
                m.copy_(identity)

    def parameters(self, exit_index: int | None = None) -> list[torch.Tensor]:
        """All importance tensors, or only exit `exit_index`'s."""
        out = []
        for layer in self.layers:
            for position, t in enumerate(layer.exits):
                if exit_index is None or t == exit_index:
                    out.append(self.importance[layer.name][position])
        return out

    def importance_of(self, exit_index: int) -> dict[str, torch.Tensor]:
        """Exit `exit_index`'s importance per layer on its route."""
        return {
            layer.name: self.importance[layer.name][layer.exits.index(exit_index)]
            for layer in self.layers
            if exit_index in layer.exits
        }

    def gates(self, exit_index: int) -> dict[str, torch.Tensor]:
        """G_t of every layer on exit t's route; only M_t carries gradient."""
        out = {}
        for layer in self.layers:
            if exit_index not in layer.exits:
                continue
            position = layer.exits.index(exit_index)
            stacked = torch.stack(
                [m if j == position else m.detach() for j, m in enumerate(self.importance[layer.name])]
            )
            # lateral normalisation of all exits at once: [R, O, I] -> sums over I
            out[layer.name] = combine_gate(lateral_normalise(stacked), position, self.kappa)
        return out

    def effective_weights(self, params: Mapping[str, torch.Tensor], exit_index: int) -> dict[str, torch.Tensor]:
        """W_t for every gated layer on exit t's route (layers off the route keep their plain V)."""
        return {name: gated_weight(params[name], gate) for name, gate in self.gates(exit_index).items()}

    def forward(self, model: nn.Module, x: torch.Tensor, exit_index: int) -> list[torch.Tensor]:
        """All exits' logits of the network as exit `exit_index` sees it (gates computed once)."""
        overrides = self.effective_weights(dict(model.named_parameters()), exit_index)
        return functional_call(model, overrides, (x,), strict=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Layer name -> stacked importance [R, O, I/groups] (route order)."""
        return {name: torch.stack([m.detach() for m in tensors]).clone() for name, tensors in self.importance.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy values in place, so optimisers keep pointing at the same tensors."""
        expected = set(self.importance)
        if set(state) != expected:
            raise TrainingError(
                "cannot resume DR-MGF: the checkpoint's gated layers "
                f"{sorted(set(state) ^ expected)} do not match this model's; resume with the same "
                "--arch and method options, or start a new run"
            )
        with torch.no_grad():
            for name, tensors in self.importance.items():
                stacked = state[name]
                if tuple(stacked.shape) != (len(tensors), *tensors[0].shape):
                    raise TrainingError(
                        f"cannot resume DR-MGF: importance of '{name}' has shape {tuple(stacked.shape)}, "
                        f"this model needs {(len(tensors), *tensors[0].shape)}; resume with the same --arch"
                    )
                for m, value in zip(tensors, stacked):
                    m.copy_(value)

    def analysis(self) -> dict[str, dict[str, Any]]:
        """Layer name -> {"exits": [0-based exits on the route], "values": [R, O, I/groups] importance}."""
        stacked = self.state_dict()
        return {layer.name: {"exits": list(layer.exits), "values": stacked[layer.name]} for layer in self.layers}
