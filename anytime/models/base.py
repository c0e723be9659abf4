"""The contract every multi-exit network in anytime follows.

A network is a chain of *stages*. Stage k maps the state handed over by stage k-1
(a tuple of tensors; `(image,)` for stage 0) to `(its own state, logits of exit k)`.
The last stage hands over an empty tuple. Stage k contains backbone block k *and* head k,
so running stages 1..k costs exactly what real early exit at exit k costs, and export can
write one graph per stage without computing anything twice.

Stages are built from standard modules only (Conv2d, BatchNorm2d, Linear, pooling, ReLU),
so export and weight folding stay plain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from anytime.errors import ConfigError

State = tuple[torch.Tensor, ...]


@dataclass
class ModelSpec:
    """Everything needed to rebuild the architecture with `anytime.models.create`."""

    arch: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(
            arch=str(d["arch"]),
            num_classes=int(d["num_classes"]),
            in_channels=int(d["in_channels"]),
            image_size=tuple(int(v) for v in d["image_size"]),  # type: ignore[arg-type]
            overrides=dict(d.get("overrides", {})),
        )


def as_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    try:
        if isinstance(image_size, (str, bytes)):
            raise TypeError(image_size)
        h, w = image_size
        return (int(h), int(w))
    except (TypeError, ValueError):
        raise ConfigError(
            f"image_size must be one size or [height, width] in pixels, e.g. 32 or [28, 32]; got {image_size!r}"
        ) from None


class Stage(nn.Module):
    """One step of the chain: `forward(state) -> (next_state, logits)`."""

    def forward(self, state: State) -> tuple[State, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class MultiExitNetwork(nn.Module):
    """Base class of all anytime models; subclasses fill `self.stages` in their constructor."""

    # How the trainer weights the exits' losses unless told otherwise (`--exit-weights`): "constant"
    # (all 1) or "sdn" (the SDN ramp of the internal exits, which SDN backbones need at lr 0.1).
    default_exit_weights: str = "constant"

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.stages = nn.ModuleList()

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        state: State = (x,)
        outputs: list[torch.Tensor] = []
        for stage in self.stages:
            state, logits = stage(state)
            outputs.append(logits)
        return outputs

    def forward_until(self, x: torch.Tensor, exit_index: int) -> list[torch.Tensor]:
        """Logits of exits 0..exit_index (0-based), running only the stages needed."""
        state: State = (x,)
        outputs: list[torch.Tensor] = []
        for stage in self.stages[: exit_index + 1]:
            state, logits = stage(state)
            outputs.append(logits)
        return outputs

    def extra_repr(self) -> str:
        s = self.spec
        return f"arch={s.arch}, exits={len(self.stages)}, classes={s.num_classes}, in={s.in_channels}x{s.image_size}"
