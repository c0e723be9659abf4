"""Atomic, resumable training checkpoints that load with `torch.load(weights_only=True)`.

Everything in a checkpoint is a tensor, a number, a string or a list/dict of those: RNG states are
stored as tensors and lists, never as pickled objects, so loading runs no code from the file.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from anytime.errors import TrainingError
from anytime.fileio import atomic_write_bytes
from anytime.formats.rundir import CONFIG_FILE
from anytime.training.base import TrainingMethod
from anytime.training.config import TrainConfig
from anytime.training.precision import Precision

CHECKPOINT_FORMAT = "anytime-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write `payload` so that `path` holds either the previous checkpoint or this one, never a part."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **payload}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainingError(
            f"no checkpoint at {path}: the run stopped before finishing its first epoch (`anytime train "
            "--resume RUN_DIR` starts it again from the beginning)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a damaged or foreign file; say which
        raise TrainingError(
            f"cannot read checkpoint {path} ({exc}); it is damaged or not an anytime checkpoint"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not an anytime training checkpoint")
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise TrainingError(
            f"{path} has checkpoint format_version {state.get('format_version')!r}; this version of anytime "
            f"reads {CHECKPOINT_VERSION}"
        )
    return state


def rng_state() -> dict[str, Any]:
    """Global RNG states of torch, CUDA, numpy and Python as tensors and lists."""
    np_state = np.random.get_state(legacy=True)  # the default; numpy's stubs type the no-argument call as a dict
    if isinstance(np_state, dict):  # only when the global generator is not MT19937
        raise TrainingError("numpy's global random generator is not MT19937; its state cannot be checkpointed")
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_run_checkpoint(
    path: Path,
    *,
    epoch: int,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    next_lr: float,
    method: TrainingMethod,
    precision: Precision,
    history: list[dict[str, Any]],
) -> None:
    """Everything a run needs to continue after `epoch` completed epochs, bit for bit."""
    save_checkpoint(
        path,
        {
            "epoch": epoch,
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            # The lr schedule is a pure function of the epoch (training.schedule); its inputs are stored.
            "schedule": {"kind": config.schedule, "next_lr": next_lr},
            "rng": rng_state(),
            "method": {"name": method.name, "state": method.state_dict(), "analysis": method.analysis()},
            # the fp16 loss scale and its growth counter: a resumed run scales (and skips) as this one would
            "precision": precision.state_dict(),
            "history": history,
        },
    )


def load_run_checkpoint(
    path: Path,
    *,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: TrainingMethod,
    precision: Precision,
    map_location: torch.device,
) -> tuple[int, list[dict[str, Any]]]:
    """Restore model, optimiser, method and RNG state in place; return (completed epochs, history)."""
    state = load_checkpoint(path, map_location=map_location)
    saved = state.get("config", {})
    for key in ("arch", "method", "data", "seed"):
        if saved.get(key) != getattr(config, key):
            raise TrainingError(
                f"checkpoint {path} was written with {key}={saved.get(key)!r} but "
                f"{CONFIG_FILE} says {getattr(config, key)!r}; the run directory was modified"
            )
    if state["method"]["name"] != method.name:
        raise TrainingError(f"checkpoint holds method '{state['method']['name']}', not '{method.name}'")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"]["state"])
        precision.load_state_dict(state.get("precision", {}))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise TrainingError(f"checkpoint {path} does not fit this run: {exc}") from exc
    set_rng_state(state["rng"])
    return int(state["epoch"]), list(state["history"])
