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
    spec = ModelSpec.from_dict(meta["spec"])
    model = create(
        spec.arch,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        **spec.overrides,
    )
    state = load_file(str(Path(directory) / MODEL_WEIGHTS), device=map_location)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, meta
