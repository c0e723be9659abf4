"""The run directory written by `anytime train` and read by `anytime export`, `anytime routes`, `eval`.

    RUN_DIR/
      config.json          fully resolved TrainConfig (the dataset with its absolute spec)
      split.json           the validation split record (anytime.data.split)
      results.jsonl        one JSON object per epoch; results.csv the same, flattened
      checkpoints/last.pt  model, optimiser, RNG and method state (atomic, every epoch; torch)
      model.safetensors    final plain (folded) weights
      model.json           {"format": "anytime-model", "format_version": 1, "spec", "preprocessing",
                            "classes", "info"}
      summary.json         final per-exit validation and test accuracy

This module owns the names and the torch-free readers; the trainer writes, `anytime.models.io` writes
and loads the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from anytime.errors import ConfigError

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
SUMMARY_FILE = "summary.json"
CHECKPOINT = Path("checkpoints") / "last.pt"
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
MODEL_FORMAT = "anytime-model"
MODEL_FORMAT_VERSION = 1


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A JSON object from `path`; ConfigError naming the file and `what` it should be otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"the {what} {path} is not a JSON object")
    return data


def is_model_dir(path: str | os.PathLike) -> bool:
    """A run (or model) directory with final weights."""
    return (Path(path) / MODEL_META).is_file()


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found; '{run_dir}' is not a run directory written by anytime train")
    return read_json_object(path, "run configuration")


def read_model_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MODEL_META
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: '{directory}' is not a model or run directory with final weights. "
            "Train one with `anytime train ... -o DIR` (a run stopped early has only checkpoints)."
        )
    meta = read_json_object(path, "model description")
    if meta.get("format") != MODEL_FORMAT:
        raise ConfigError(f"{path} is not an anytime model description (format={meta.get('format')!r})")
    return meta


def model_meta(
    spec: dict[str, Any], preprocessing: dict[str, Any], classes: list[str], info: dict[str, Any]
) -> dict[str, Any]:
    """The content of model.json."""
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "spec": spec,
        "preprocessing": preprocessing,
        "classes": list(classes),
        "info": info,
    }
