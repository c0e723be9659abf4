"""The run directory's human-readable records: config.json (resolved), results.jsonl / results.csv (one
row per epoch) and summary.json. File names come from `anytime.formats.rundir`."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anytime.fileio import atomic_write_json, atomic_write_text
from anytime.formats.rundir import CONFIG_FILE, RESULTS_CSV, RESULTS_JSONL, SUMMARY_FILE
from anytime.training.config import TrainConfig, options_to_dict


def write_config(run_dir: Path, config: TrainConfig, method_options: Any) -> None:
    """config.json: the configuration with the method options resolved to their complete, typed values."""
    resolved = config.to_dict()
    resolved["method_options"] = options_to_dict(method_options)
    atomic_write_json(run_dir / CONFIG_FILE, resolved)


def epoch_row(
    epoch: int,
    lr: float,
    metrics: Mapping[str, float],
    val: list[float],
    train_time_s: float,
    epoch_time_s: float,
    images: int,
    train_cpu_s: float | None = None,
) -> dict[str, Any]:
    """The results row of `epoch` (0-based; the row counts from 1). `train_cpu_s` is the process's CPU time
    over the training phase (all threads): on a shared machine it measures a one-thread run's compute where
    wall time also counts the waits for a core."""
    return {
        "epoch": epoch + 1,
        "lr": lr,
        **{k: float(v) for k, v in metrics.items()},
        "val_acc": val,
        "val_acc_mean": float(np.mean(val)) if val else None,
        "train_time_s": round(train_time_s, 4),
        "epoch_time_s": round(epoch_time_s, 4),
        **({"train_cpu_s": round(train_cpu_s, 4)} if train_cpu_s is not None else {}),
        "images_per_s": round(images / max(train_time_s, 1e-9), 2),
    }


def write_results(run_dir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """results.jsonl as the rows are; results.csv with list values spread over `key_0, key_1, ...`."""
    atomic_write_text(run_dir / RESULTS_JSONL, "".join(json.dumps(r) + "\n" for r in history))
    rows = [flatten(r) for r in history]
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / RESULTS_CSV, out.getvalue())


def flatten(row: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                flat[f"{k}_{i}"] = item
        else:
            flat[k] = v
    return flat


def write_summary(
    run_dir: Path,
    config: TrainConfig,
    val: list[float],
    test: list[float] | None,
    history: Sequence[Mapping[str, Any]],
    world_size: int,
) -> None:
    times = [r["train_time_s"] for r in history]
    summary = {
        "method": config.method,
        "arch": config.arch,
        "epochs": config.epochs,
        "val_accuracy": val,
        "val_accuracy_mean": float(np.mean(val)) if val else None,
        "test_accuracy": test,
        "test_accuracy_mean": None if test is None else float(np.mean(test)),
        "train_time_s": float(sum(times)),
        "epoch_time_s": float(np.mean(times)) if times else None,
        "world_size": world_size,
    }
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
