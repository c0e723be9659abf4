"""The validation split: a deterministic hold-out of the training split, saved as `split.json` in a run.

The record stores the indices themselves (not only the seed), so a run restores exactly the images
it was validated on even if the hold-out recipe changes; `restore_split` checks that the dataset is
still the one the record was made from (size and a hash of the labels).

Format version 2 stores each sorted index set as runs, `[[start, stop], ...]` (half-open), in
`train_ranges` and `val_ranges`, and `split_record_text` writes each on one line: the training split of a
hold-out is the complement of a few thousand images, a few thousand runs instead of every index (a
Fashion-MNIST run's record: 636 KB as version 1's indented index lists, 61 KB as runs). Version 1
(`train_indices` / `val_indices`) is still read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np

from anytime.data.base import Dataset, IndexedSplit, Split
from anytime.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

SPLIT_FORMAT = "anytime-split"
SPLIT_FORMAT_VERSION = 2
READABLE_SPLIT_VERSIONS = (1, 2)
CIFAR_VAL_SIZE = 5000  # the usual CIFAR hold-out (MSDNet and most anytime papers)
DEFAULT_VAL_FRACTION = 0.1


def labels_sha256(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


def resolve_val_size(val_size: int | float | None, n_train: int, kind: str) -> int:
    """Number of held-out images: an int count, a float fraction in [0, 1), or the kind's default."""
    if val_size is None:
        count = CIFAR_VAL_SIZE if kind in ("cifar10", "cifar100") else round(DEFAULT_VAL_FRACTION * n_train)
        return min(count, n_train - 1)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float, np.integer, np.floating)):
        raise ConfigError(f"val_size={val_size!r} is not a number; give a count (5000) or a fraction (0.1)")
    if isinstance(val_size, (float, np.floating)) and not float(val_size).is_integer():
        if not 0.0 < val_size < 1.0:
            raise ConfigError(f"val_size={val_size} is not a fraction in (0, 1) nor a whole count")
        return int(round(float(val_size) * n_train))
    count = int(val_size)
    if not 0 <= count < n_train:
        raise ConfigError(
            f"val_size={count} is out of range for a training split of {n_train} images; "
            f"give 0..{n_train - 1} or a fraction such as 0.1"
        )
    return count


def index_ranges(indices: np.ndarray) -> list[list[int]]:
    """Sorted, distinct indices as half-open runs [[start, stop], ...]: [0, 1, 2, 5] -> [[0, 3], [5, 6]]."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], breaks))]
    stops = idx[np.concatenate((breaks - 1, [idx.size - 1]))] + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def ranges_indices(ranges: Any, name: str) -> np.ndarray:
    """The indices of half-open runs, checked to be increasing and disjoint (else DatasetError)."""
    try:
        pairs = np.asarray(ranges, dtype=np.int64).reshape(-1, 2) if len(ranges) else np.zeros((0, 2), np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"split record's {name} are not [[start, stop], ...] pairs ({exc}); re-create it") from exc
    if (pairs[:, 1] <= pairs[:, 0]).any() or (pairs[1:, 0] <= pairs[:-1, 1]).any():
        raise DatasetError(f"split record's {name} are not increasing, non-empty, disjoint runs; re-create it")
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in pairs]) if len(pairs) else pairs[:, 0]


def split_record_text(record: dict[str, Any]) -> str:
    """The record as split.json holds it: one field a line, each list of runs on one line."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in record.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _jsonable_number(value: int | float | None) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, (float, np.floating)):
        return float(value)
    return int(value)


def split_train_val(
    dataset: Dataset, val_size: int | float | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Training and validation indices and a JSON-able record of them.

    When the source has its own validation split (imagefolder `val/`, npz `x_val`), that split is used
    and the training split is kept whole; `val_indices` then index `dataset.val`. Otherwise a seeded
    random hold-out of `val_size` images (default 5,000 for CIFAR, 10% otherwise) is taken from
    `dataset.train`; both index arrays are sorted.
    """
    n_train = len(dataset.train)
    if dataset.val is not None:
        if val_size is not None:
            logger.info("%s has its own validation split; val_size=%s is ignored", dataset.spec, val_size)
        train_idx = np.arange(n_train, dtype=np.int64)
        val_idx = np.arange(len(dataset.val), dtype=np.int64)
        source = "dataset-val"
        val_labels = dataset.val.labels
    else:
        count = resolve_val_size(val_size, n_train, dataset.kind)
        perm = np.random.default_rng(seed).permutation(n_train)
        val_idx = np.sort(perm[:count]).astype(np.int64)
        train_idx = np.sort(perm[count:]).astype(np.int64)
        source = "holdout"
        val_labels = dataset.train.labels[val_idx]
    record = {
        "format": SPLIT_FORMAT,
        "format_version": SPLIT_FORMAT_VERSION,
        "source": source,
        "dataset": dataset.spec,
        "seed": int(seed),
        "val_size": _jsonable_number(val_size),
        "train_size": n_train,
        "train_labels_sha256": labels_sha256(dataset.train.labels),
        "val_labels_sha256": labels_sha256(val_labels),
        "train_count": int(len(train_idx)),
        "val_count": int(len(val_idx)),
        "train_ranges": index_ranges(train_idx),
        "val_ranges": index_ranges(val_idx),
    }
    return train_idx, val_idx, record


def restore_split(dataset: Dataset, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The indices of `record`, after checking it was made from this dataset (else DatasetError)."""
    if not isinstance(record, dict) or record.get("format") != SPLIT_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise DatasetError(
            f"not a validation split record (format={found!r}); expected the split.json written by split_train_val"
        )
    version = record.get("format_version")
    if version not in READABLE_SPLIT_VERSIONS:
        raise DatasetError(
            f"split record format_version {version!r} is not supported (this version reads "
            f"{', '.join(map(str, READABLE_SPLIT_VERSIONS))}); upgrade anytime or make a new split"
        )
    try:
        source = record["source"]
        if version == 1:
            train_idx = np.asarray(record["train_indices"], dtype=np.int64)
            val_idx = np.asarray(record["val_indices"], dtype=np.int64)
        else:
            train_idx = ranges_indices(record["train_ranges"], "train_ranges")
            val_idx = ranges_indices(record["val_ranges"], "val_ranges")
        n_train_then = int(record["train_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(
            f"split record is incomplete or malformed ({exc!r}); re-create it with split_train_val"
        ) from exc

    made_from = record.get("dataset", "?")
    n_train = len(dataset.train)
    if n_train != n_train_then:
        raise DatasetError(
            f"the split was made from {made_from} with {n_train_then} training images, but {dataset.spec} has "
            f"{n_train}; the dataset changed: use the original data or make a new split"
        )
    if record.get("train_labels_sha256") not in (None, labels_sha256(dataset.train.labels)):
        raise DatasetError(
            f"the training labels of {dataset.spec} differ from those of {made_from} the split was made from; "
            "the dataset changed: use the original data or make a new split"
        )
    if source == "dataset-val":
        if dataset.val is None:
            raise DatasetError(f"the split uses the validation split of {made_from}, but {dataset.spec} has none")
        n_val = len(dataset.val)
    elif source == "holdout":
        n_val = n_train
        if np.intersect1d(train_idx, val_idx).size:
            raise DatasetError("split record is inconsistent: training and validation indices overlap")
    else:
        raise DatasetError(f"split record has unknown source {source!r}; expected 'holdout' or 'dataset-val'")
    for name, idx, n in (("train", train_idx, n_train), ("val", val_idx, n_val)):
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise DatasetError(f"split record has {name} index {int(idx.max())} out of range for {n} images")
    val_split = dataset.val if source == "dataset-val" else dataset.train
    assert val_split is not None  # a dataset-val split without dataset.val was rejected above
    val_labels = val_split.labels[val_idx]
    if record.get("val_labels_sha256") not in (None, labels_sha256(val_labels)):
        raise DatasetError(
            f"the validation labels of {dataset.spec} differ from those of {made_from}; "
            "the dataset changed: use the original data or make a new split"
        )
    return train_idx, val_idx


def val_split_images(dataset: Dataset, record: dict[str, Any]) -> Split:
    """The validation images of `record` as a split (never augmented: use a loader with train=False)."""
    _, val_idx = restore_split(dataset, record)
    base = dataset.val if record["source"] == "dataset-val" else dataset.train
    assert base is not None  # checked by restore_split
    return IndexedSplit(base, val_idx)


def train_split_images(dataset: Dataset, record: dict[str, Any]) -> Split:
    """The training images of `record` (the training split minus the hold-out) as a split."""
    train_idx, _ = restore_split(dataset, record)
    return IndexedSplit(dataset.train, train_idx)
