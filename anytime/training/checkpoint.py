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

from anytime.errors import TrainingError
from anytime.fileio import atomic_write_bytes

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
            f"no checkpoint at {path}: the run stopped before finishing its first epoch; start it again "
            "without --resume"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a damaged or foreign file; say which
        raise TrainingError(f"cannot read checkpoint {path} ({exc}); it is damaged or not an anytime checkpoint") from exc
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
    np_state = np.random.get_state()
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
