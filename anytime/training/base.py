"""The contract between the trainer and training methods.

A method is a stateful strategy that is *given* the model, its exits' routes and the optimiser through a
`TrainingContext`; it never lives inside the model class and the trainer never tests method names.
A method owns whole epochs (DR-MGF runs T exit passes and a fusion pass per epoch); simple per-step
methods derive from `StepwiseMethod` in `anytime.training.methods.stepwise` and only say how the per-exit
losses become gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import torch
from torch import nn

from anytime.models.base import MultiExitNetwork

if TYPE_CHECKING:  # pragma: no cover
    from anytime.training.precision import Precision

F = TypeVar("F", bound=Callable[..., Any])


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> Any: ...
    def set_description(self, desc: str | None = None, refresh: bool = True) -> Any: ...
    def close(self) -> Any: ...


class TrainingContext(Protocol):
    """What the trainer hands to a method. Implemented by `anytime.training.trainer`."""

    model: MultiExitNetwork
    device: torch.device
    num_exits: int
    epochs: int
    optimizer: torch.optim.Optimizer  # SGD over all model parameters, lr set by the trainer each epoch
    steps_per_epoch: int  # optimiser steps in one pass over this rank's shard of the training set
    routes: "Routes"
    rank: int
    world_size: int
    # Mixed precision (--amp): run forward passes in `precision.autocast()`, differentiate
    # `precision.scale(loss)`, step with `precision.step(*optimizers)` once per mini-batch.
    precision: "Precision"

    def train_batches(
        self, epoch: int, phase: str, part: tuple[int, int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over this rank's shard of the training set, (x, y) on `device`.

        Order and augmentation depend only on (seed, epoch, phase) so a resumed run repeats them.
        `part=(k, n)`: only the k-th of n contiguous parts of that pass (the n parts of one phase are
        disjoint and cover it). The trainer's progress bar shows `phase` while the pass runs.
        """
        ...

    def exit_losses(self, outputs: list[torch.Tensor], targets: torch.Tensor, epoch: int) -> list[torch.Tensor]:
        """Per-exit losses (cross-entropy, plus distillation from the last exit when enabled), each already
        multiplied by its exit weight at `epoch` (`--exit-weights`), so every method sees the same weighting."""
        ...

    def lr(self, epoch: int) -> float:
        """The scheduled learning rate of the network weights at `epoch` (0-based)."""
        ...

    def compiled(self, fn: F) -> F:
        """`fn` under the run's `--compile` setting (`fn` itself when off). The model's own forward is
        already compiled; a method wraps the step functions it builds around it (DR-MGF's gated forward)."""
        ...

    def sync_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Average `.grad` of `params` over ranks (no-op on one process). Call before every step."""
        ...

    def sync_buffers(self, module: nn.Module) -> None:
        """Average floating buffers (BatchNorm running stats) over ranks (no-op on one process)."""
        ...

    def check_finite(self, loss: torch.Tensor, epoch: int, step: int, exit_index: int | None) -> None:
        """Raise TrainingError naming the epoch, step and exit when `loss` is NaN or infinite."""
        ...

    def log_step(self, loss: float, batch_size: int) -> None:
        """Account one optimisation step (running loss, images/s) for the progress bar and metrics."""
        ...


@dataclass(frozen=True)
class MethodOptions:
    """Base of each method's frozen hyper-parameter dataclass (validated in __post_init__)."""


class TrainingMethod:
    """A training method (strategy). Subclasses set `name` and `Options` and register themselves."""

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    # False for a method that differentiates one forward more than once: `--compile` refuses it, since a
    # compiled graph's second backward is wrong (anytime.training.compilation).
    compilable: ClassVar[bool] = True

    def __init__(self, options: MethodOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def setup(self, ctx: TrainingContext) -> None:
        """Called once after the model and optimiser exist and before any resume."""

    def train_epoch(self, ctx: TrainingContext, epoch: int) -> dict[str, float]:
        """Train one epoch; return metrics such as {"loss": ...} for the results file."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """All method state needed to resume exactly (tensors allowed; saved with torch.save)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def plain_model(self, model: MultiExitNetwork) -> MultiExitNetwork:
        """The deployable model with any reparameterisation folded into plain weights."""
        return model

    def analysis(self) -> dict[str, Any]:
        """Optional tensors kept in the checkpoint for analysis (e.g. importance variables)."""
        return {}


@dataclass
class Routes:
    """Which parameters each exit's output reaches (its route) and which are shared by several exits."""

    names: list[str]  # parameter names in model.named_parameters() order
    per_exit: list[set[str]]  # per_exit[t] = names on exit t's route

    def owners(self, name: str) -> list[int]:
        return [t for t, route in enumerate(self.per_exit) if name in route]

    def is_shared(self, name: str) -> bool:
        return len(self.owners(name)) >= 2

    @property
    def shared(self) -> list[str]:
        return [n for n in self.names if self.is_shared(n)]


def compute_routes(model: MultiExitNetwork, example: torch.Tensor) -> Routes:
    """One backward pass per exit on `example` (train mode) records which parameters each exit reaches."""
    was_training = model.training
    model.train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    per_exit: list[set[str]] = []
    # Snapshot BatchNorm buffers: the probing forward must not move running statistics.
    buffers = {name: buf.clone() for name, buf in model.named_buffers()}
    try:
        for t in range(model.num_exits):
            outputs = model.forward_until(example, t)
            grads = torch.autograd.grad(outputs[t].sum(), [params[n] for n in names], allow_unused=True)
            per_exit.append({n for n, g in zip(names, grads) if g is not None})
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(buffers[name])
        model.train(was_training)
    return Routes(names=names, per_exit=per_exit)


MethodFactory = Callable[..., TrainingMethod]
