"""Saving and loading plain model weights with the spec and preprocessing that travel with them.

A model directory (a run directory, or any folder) holds:
- `model.safetensors`: the plain state dict (no importance variables, no optimiser state);
- `model.json`: {"format": "anytime-model", "format_version": 1, "spec": ModelSpec,
  "preprocessing": PreprocessingSpec.to_manifest() (the bundle's `input` block), "classes": [...], "info": {...free-form provenance...}}.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from anytime.errors import ConfigError
from anytime.fileio import atomic_write_bytes, atomic_write_json
from anytime.formats.preprocessing import PreprocessingSpec
from anytime.formats.rundir import (
    MODEL_META,
    MODEL_WEIGHTS,
    model_meta,
    read_model_meta,
)
from anytime.models.base import ModelSpec, MultiExitNetwork


def save_model(
    model: MultiExitNetwork,
    directory: str | os.PathLike,
    preprocessing: PreprocessingSpec,
    classes: list[str] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write plain weights (safetensors) and metadata atomically into `directory`."""
    from safetensors.torch import save as st_save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / MODEL_WEIGHTS, st_save(state))
    n = model.spec.num_classes
    meta = model_meta(
        model.spec.to_dict(),
        preprocessing.to_manifest(),
        list(classes) if classes is not None else [str(i) for i in range(n)],
        info or {},
    )
    atomic_write_json(directory / MODEL_META, meta)
    return directory


def load_model(directory: str | os.PathLike, map_location: str = "cpu") -> tuple[MultiExitNetwork, dict[str, Any]]:
    """Rebuild the architecture from model.json and load the plain weights (eval mode)."""
    from safetensors.torch import load_file

    from anytime.models.registry import create

    meta = read_model_meta(directory)
    meta_path = Path(directory) / MODEL_META
    try:
        spec = ModelSpec.from_dict(meta["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{meta_path} has no valid 'spec' ({type(exc).__name__}: {exc}); the file is damaged: train the run "
            "again, or restore model.json"
        ) from None
    model = create(
        spec.arch,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        **spec.overrides,
    )
    weights = Path(directory) / MODEL_WEIGHTS
    if not weights.is_file():
        raise ConfigError(
            f"{weights} not found: {directory} has model.json but no weights; copy model.safetensors along with "
            "it, or resume the run (`anytime train --resume RUN_DIR` writes both again)"
        )
    try:
        state = load_file(str(weights), device=map_location)
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors' own error type, or load_state_dict's RuntimeError
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        first = text if len(text) <= 240 else text[:237] + "..."
        raise ConfigError(
            f"cannot load the weights {weights} into the {spec.arch} described by {meta_path} ({first}); one of the "
            "two files is damaged or they come from different runs: resume the run (`anytime train --resume "
            "RUN_DIR` writes both again) or train it again"
        ) from exc
    model.eval()
    return model, meta
