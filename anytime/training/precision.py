"""Mixed precision of the training steps (`--amp`): autocast for forward passes and, for fp16, a loss scaler.

bf16 keeps float32's exponent range, so it needs no loss scaling. fp16 does: small gradients underflow,
so the loss is multiplied by a scale before differentiation and the gradients are divided by it before
the optimiser step, which `torch.amp.GradScaler` skips (and lowers the scale) when a gradient is inf or
NaN. The scaler's state is part of the checkpoint, so a resumed run continues with the same scale.

Methods use it through `TrainingContext.precision`: forward passes inside `autocast()`, differentiate
`scale(loss)`, step with `step(*optimizers)` once per mini-batch. A method that transforms gradients
non-linearly (the TorchJD aggregators) undoes `loss_scale` first.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch

from anytime.errors import ConfigError, TrainingError

AMP_MODES = ("off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """The numeric precision of one run's training steps; "off" is plain float32 with no overhead."""

    def __init__(self, mode: str = "off", device: torch.device | str = "cpu") -> None:
        if mode not in AMP_MODES:
            raise ConfigError(f"invalid amp={mode!r}: choose one of {', '.join(AMP_MODES)}")
        self.mode = mode
        self.device_type = torch.device(device).type
        self.dtype = _DTYPES.get(mode)
        self.scaler: torch.amp.GradScaler | None = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None

    def autocast(self) -> AbstractContextManager[Any]:
        """Run forward passes (and the losses) of a training step inside this."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate: multiplied by the fp16 loss scale, unchanged otherwise."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    @property
    def loss_scale(self) -> float:
        """The factor `scale` multiplies by (1.0 without fp16)."""
        return 1.0 if self.scaler is None else float(self.scaler.get_scale())

    def step(self, *optimizers: torch.optim.Optimizer) -> None:
        """Step every optimiser on the gradients of `scale(loss)`; with fp16, unscale first, skip a step
        whose gradients hold inf or NaN, and update the scale (once per mini-batch, after all steps)."""
        if self.scaler is None:
            for optimizer in optimizers:
                optimizer.step()
            return
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode", "off") != self.mode:
            raise TrainingError(
                f"the checkpoint was trained with amp={state.get('mode')!r}, this run uses amp={self.mode!r}; "
                "resume with the run's own configuration"
            )
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
