"""Training multi-exit networks: `train(TrainConfig(...))`, `resume(run_dir)` and the method registry.

    from anytime.training import TrainConfig, train
    result = train(TrainConfig(arch="msdnet-tiny", data="npz:fashion-mnist.npz", method="joint",
                               epochs=8, out="runs/fm"))
    result.val_accuracy, result.test_accuracy     # per exit

Methods are strategies (`anytime.training.base.TrainingMethod`) looked up by name in
`anytime.training.methods`; see `list_methods()`.
"""

from __future__ import annotations

from anytime.errors import require_torch

require_torch(
    "Training (anytime train, anytime.training)"
)  # before any torch import: one clear line instead of a traceback

from typing import TYPE_CHECKING

from anytime._lazy import lazy_getattr

if TYPE_CHECKING:  # pragma: no cover
    from anytime.training.config import TrainConfig
    from anytime.training.methods import create_method, list_methods
    from anytime.training.trainer import RunResult, Trainer, resume, train

__all__ = ["RunResult", "TrainConfig", "Trainer", "create_method", "list_methods", "resume", "train"]

_LAZY = {
    "TrainConfig": "anytime.training.config",
    "RunResult": "anytime.training.trainer",
    "Trainer": "anytime.training.trainer",
    "train": "anytime.training.trainer",
    "resume": "anytime.training.trainer",
    "create_method": "anytime.training.methods",
    "list_methods": "anytime.training.methods",
}


__getattr__ = lazy_getattr(__name__, _LAZY)
