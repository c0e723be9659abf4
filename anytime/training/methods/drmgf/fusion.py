"""DR-MGF's meta-weighted fusion of the exits' updates (docs/drmgf.md, "Fusion").

A shared parameter p on the route of exits E gets θ0 + Σ_{t∈E} Ω_t ⊙ Δ_t / Σ_{t∈E} Ω_t with
Ω_t = ratio_t · |s_t|: per [o, i/groups] connection for conv weights (ratio_t = |M_t| / Σ_i' |M_t| on
gated convs, 1 where there is no M), per channel for BatchNorm γ and β (ratio 1).

Speed: the fused values are rebuilt at every step of the meta pass. Doing that parameter by parameter
costs about ten small kernels each, which on a GPU dominates the pass for MSDNet's hundreds of small
tensors. So the parameters that share one set of exits and one kernel size form a `ScaleGroup` whose s,
ratios, Δ and θ0 are flat [R, ·] buffers (Δ viewed as [R, connections, k*k], so each connection's scale
broadcasts over its slice without a gather), and a whole group is fused in a handful of kernels. The
per-parameter views stay available for state and analysis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from anytime.errors import TrainingError
from anytime.training.base import Routes
from anytime.training.methods.drmgf.gates import RouteGates, conv_weights


def batchnorm_params(model: nn.Module) -> set[str]:
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            names.update({f"{prefix}.weight", f"{prefix}.bias"})
    return names


def scaled_params(model: nn.Module, routes: Routes) -> dict[str, tuple[int, ...]]:
    """Shared params fused with learned scales -> the scale shape (per connection / per channel).

    Every other shared parameter (biases of convs and linears, shared linear weights) is fused by the
    plain mean.
    """
    params = dict(model.named_parameters())
    convs = set(conv_weights(model))
    norms = batchnorm_params(model)
    out = {}
    for name in routes.shared:
        if name in convs:
            out[name] = tuple(params[name].shape[:2])
        elif name in norms:
            out[name] = tuple(params[name].shape)
    return out


class ScaleGroup:
    """Meta-fused parameters with the same exits and elements per scale; flat [R, ·] buffers."""

    def __init__(
        self,
        exits: tuple[int, ...],
        members: list[tuple[str, tuple[int, ...], tuple[int, ...]]],  # (name, param shape, scale shape)
        init: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.exits = exits
        self.names = [name for name, _, _ in members]
        self.shapes = {name: shape for name, shape, _ in members}
        self.scale_shapes = {name: scale for name, _, scale in members}
        self.elements: dict[str, tuple[int, int]] = {}  # name -> (offset, count) in the flat weights
        self.slots: dict[str, tuple[int, int]] = {}  # name -> (offset, count) in the flat scales
        elem, slot = 0, 0
        for name, shape, scale in members:
            n_elem, n_slot = math.prod(shape), math.prod(scale)
            self.elements[name], self.slots[name] = (elem, n_elem), (slot, n_slot)
            elem, slot = elem + n_elem, slot + n_slot
        rows = len(exits)
        # row-major: the elements of one connection (its k x k slice) are consecutive
        self.per_scale = elem // slot
        self.scale = torch.full((rows, slot), float(init), device=device, dtype=dtype, requires_grad=True)
        self.previous = self.scale.detach().clone()  # s after the previous epoch, for the EMA
        self.ratio = torch.ones((rows, slot), device=device, dtype=dtype)
        self.deltas = torch.zeros((rows, elem), device=device, dtype=dtype)
        self.start = torch.zeros(elem, device=device, dtype=dtype)

    def scale_view(self, name: str) -> torch.Tensor:
        offset, count = self.slots[name]
        return self.scale.detach()[:, offset : offset + count].view(len(self.exits), *self.scale_shapes[name])

    def previous_view(self, name: str) -> torch.Tensor:
        offset, count = self.slots[name]
        return self.previous[:, offset : offset + count].view(len(self.exits), *self.scale_shapes[name])

    def delta_view(self, name: str) -> torch.Tensor:
        offset, count = self.elements[name]
        return self.deltas[:, offset : offset + count].view(len(self.exits), *self.shapes[name])

    @torch.no_grad()
    def begin(self, start: Mapping[str, torch.Tensor], gates: RouteGates | None) -> None:
        """Take θ0 and the importance ratios |M_t| / Σ_i' |M_t| (constants during the meta pass)."""
        for name in self.names:
            offset, count = self.elements[name]
            self.start[offset : offset + count].copy_(start[name].flatten())
            slot, n = self.slots[name]
            if gates is not None and name in gates.importance:
                m = torch.stack([t.detach().abs() for t in gates.importance[name]])
                self.ratio[:, slot : slot + n].copy_((m / m.sum(dim=2, keepdim=True).clamp_min(1e-12)).flatten(1))
            else:
                self.ratio[:, slot : slot + n].fill_(1.0)

    def fused(self) -> dict[str, torch.Tensor]:
        """θ0 + Σ_t Ω_t Δ_t / Σ_t Ω_t for every member, differentiable in s."""
        omega = self.scale.abs() * self.ratio
        weights = omega / omega.sum(dim=0).clamp_min(1e-12)  # [R, connections]
        rows = len(self.exits)
        update = (weights.unsqueeze(-1) * self.deltas.view(rows, -1, self.per_scale)).sum(dim=0)
        flat = self.start + update.flatten()
        out = {}
        for name in self.names:
            offset, count = self.elements[name]
            out[name] = flat[offset : offset + count].view(self.shapes[name])
        return out


class FusionScales:
    """All meta-fused parameters, grouped by the exits they are shared by."""

    def __init__(self, model: nn.Module, routes: Routes, init: float, device: torch.device) -> None:
        params = dict(model.named_parameters())
        grouped: dict[tuple[tuple[int, ...], int], list[tuple[str, tuple[int, ...], tuple[int, ...]]]] = {}
        for name, scale_shape in scaled_params(model, routes).items():
            shape = tuple(params[name].shape)
            key = (tuple(routes.owners(name)), math.prod(shape) // math.prod(scale_shape))
            grouped.setdefault(key, []).append((name, shape, scale_shape))
        self.groups = [
            ScaleGroup(exits, members, init, device, params[members[0][0]].dtype)
            for (exits, _), members in sorted(grouped.items())
        ]
        self.group_of = {name: group for group in self.groups for name in group.names}

    def __bool__(self) -> bool:
        return bool(self.groups)

    def __contains__(self, name: object) -> bool:
        return name in self.group_of

    def parameters(self) -> list[torch.Tensor]:
        return [group.scale for group in self.groups]

    def views(self) -> dict[str, torch.Tensor]:
        """Parameter name -> its scales [R, *scale shape] (a detached view, rows in route order)."""
        return {name: group.scale_view(name) for group in self.groups for name in group.names}

    def delta_views(self) -> dict[str, torch.Tensor]:
        return {name: group.delta_view(name) for group in self.groups for name in group.names}

    def begin(self, start: Mapping[str, torch.Tensor], gates: RouteGates | None) -> None:
        for group in self.groups:
            group.begin(start, gates)

    def fused(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for group in self.groups:
            out.update(group.fused())
        return out

    @torch.no_grad()
    def smooth(self, beta: float) -> None:
        """s <- beta * s_previous + (1 - beta) * s, in place so the optimiser keeps the same tensors."""
        for group in self.groups:
            group.scale.mul_(1.0 - beta).add_(group.previous, alpha=beta)

    @torch.no_grad()
    def remember(self) -> None:
        for group in self.groups:
            group.previous.copy_(group.scale)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "scales": {name: view.clone() for name, view in self.views().items()},
            "previous": {name: g.previous_view(name).clone() for g in self.groups for name in g.names},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        if set(state.get("scales", {})) != set(self.group_of):
            raise TrainingError(
                "cannot resume DR-MGF: the checkpoint's fusion scales do not match this model and options; "
                "resume with the same --arch, --method and method options, or start a new run"
            )
        for name, group in self.group_of.items():
            offset, count = group.slots[name]
            for target, source in ((group.scale, state["scales"][name]), (group.previous, state["previous"][name])):
                if source.numel() != count * len(group.exits):
                    raise TrainingError(
                        f"cannot resume DR-MGF: fusion scales of '{name}' have shape {tuple(source.shape)}, this "
                        "model needs a different one; resume with the same --arch"
                    )
                target[:, offset : offset + count].copy_(source.reshape(len(group.exits), count))
