"""What an export reads: the model of a run (or model) directory and its held-out validation images."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anytime.errors import ConfigError, DatasetError
from anytime.formats.rundir import CONFIG_FILE, SPLIT_FILE, read_json_object
from anytime.models.base import MultiExitNetwork

log = logging.getLogger(__name__)


@dataclass
class ExportSource:
    run_dir: Path
    model: MultiExitNetwork
    meta: dict[str, Any]  # model.json
    config: dict[str, Any]  # config.json ({} for a bare model directory)
    data_spec: str  # normalised KIND:PATH of the dataset actually opened
    val_split: Any  # anytime.data Split of the validation images, in split order
    val_indices: np.ndarray  # int64 indices of those images in their source split
    split_source: str  # "holdout" (indices into the training split) or "dataset-val"


def _open_dataset(spec: str, run_dir: Path, overridden: bool):
    from anytime.data import open_dataset

    try:
        return open_dataset(spec)
    except DatasetError as exc:
        if overridden:
            raise
        raise DatasetError(
            f"cannot open the dataset of run {run_dir} ({spec}): {exc}. The calibration data needs the run's "
            "validation images: if the dataset moved, pass its new location with --data KIND:PATH "
            "(data=... in Python)"
        ) from exc


def load_source(
    run_dir: str | os.PathLike, data: str | None = None, split: str | os.PathLike | None = None
) -> ExportSource:
    """Load the model of `run_dir` and find its validation images.

    `data` overrides the run's dataset spec (config.json "data"); `split` overrides its split.json.
    A bare model directory (no config.json) needs `data`, and a split: split.json, `split`, or a dataset
    with its own validation split.
    """
    from anytime.data import restore_split, val_split_images
    from anytime.models import load_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist; give the -o/--output directory of `anytime train`")
    model, meta = load_model(run_dir)
    config_path = run_dir / CONFIG_FILE
    config = read_json_object(config_path, "run configuration") if config_path.is_file() else {}
    spec = data if data is not None else config.get("data")
    if not spec:
        raise DatasetError(
            f"{run_dir} has no {CONFIG_FILE} naming its dataset; pass the dataset with --data KIND:PATH "
            "(its validation images become the calibration data)"
        )
    dataset = _open_dataset(str(spec), run_dir, overridden=data is not None)
    split_path = Path(split) if split is not None else run_dir / SPLIT_FILE
    if split_path.is_file():
        record = read_json_object(split_path, "validation split record")
        _, val_indices = restore_split(dataset, record)
        val_split = val_split_images(dataset, record)
        source = str(record.get("source"))
    elif split is not None:
        raise ConfigError(f"split record {split_path} does not exist; give the split.json of the training run")
    elif dataset.val is not None:
        log.info("%s has no %s; using the validation split of %s", run_dir, SPLIT_FILE, dataset.spec)
        val_split = dataset.val
        val_indices = np.arange(len(dataset.val), dtype=np.int64)
        source = "dataset-val"
    else:
        raise DatasetError(
            f"{run_dir} has no {SPLIT_FILE} and {dataset.spec} has no validation split of its own, so there are "
            "no held-out images for the calibration data; pass the training run's split.json with --split FILE"
        )
    if len(val_split) == 0:
        raise DatasetError(
            f"the validation split of {dataset.spec} is empty (the run was trained with --val-size 0?), and "
            "calibration needs held-out images the model did not train on: train the run with --val-size above 0 "
            "(the default holds out 5,000 images or 10%)"
        )
    return ExportSource(
        run_dir, model, meta, config, dataset.spec, val_split, np.asarray(val_indices, np.int64), source
    )
