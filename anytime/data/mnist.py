"""`mnist:DIR`, `fashion-mnist:DIR` — the official IDX files, gzipped or raw.

DIR holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte, each optionally with .gz (a `raw/` sub-folder, as torchvision lays them out,
is found too).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

from anytime.data.base import FASHION_MNIST_CLASSES, OFFICIAL_STATS, ArraySplit, Dataset
from anytime.errors import DatasetError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
LAYOUT = "expected a directory with " + ", ".join(f"{name}[.gz]" for name in FILES.values())


def _find(directory: Path, stem: str) -> Path | None:
    # Some mirrors write "train-images.idx3-ubyte" (dot instead of dash).
    dotted = stem.replace("-idx", ".idx")
    for folder in (directory, directory / "raw"):
        for name in (stem, f"{stem}.gz", dotted, f"{dotted}.gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x0000080N, big-endian int32 dims) as a numpy array."""
    try:
        raw = path.read_bytes()
        # By content, not by name: browsers save the .gz files decompressed under their old name, and back.
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"{path}: cannot read ({exc}); {LAYOUT}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic number); {LAYOUT}")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DatasetError(f"{path}: IDX data type 0x{dtype_code:02x}; expected 0x08 (unsigned byte)")
    if ndim != expected_ndim:
        raise DatasetError(f"{path}: IDX file with {ndim} dimensions; expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    size = math.prod(dims)  # Python ints: a damaged header's huge dimensions must not overflow
    if len(data) - header != size:
        raise DatasetError(f"{path}: holds {len(data) - header} bytes of data; the header {dims} says {size}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _open(directory: Path, kind: str, classes: list[str]) -> Dataset:
    if not directory.is_dir():
        raise DatasetError(f"{kind}:{directory}: not a directory; {LAYOUT}")
    paths = {}
    for key, stem in FILES.items():
        found = _find(directory, stem)
        if found is None:
            raise DatasetError(f"{kind}:{directory}: missing {stem}[.gz]; {LAYOUT}")
        paths[key] = found
    arrays = {}
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"], 3)
        labels = read_idx(paths[f"{split}_labels"], 1).astype(np.int64)
        if len(images) != len(labels):
            label_file = paths[f"{split}_labels"].name
            raise DatasetError(
                f"{paths[f'{split}_images']}: {len(images)} images but {label_file} has {len(labels)} labels"
            )
        if labels.size and labels.max() >= len(classes):
            raise DatasetError(f"{paths[f'{split}_labels']}: label {int(labels.max())}; expected 0..{len(classes) - 1}")
        arrays[split] = ArraySplit(images[..., None], labels)
    train_images, test_images = arrays["train"].images, arrays["test"].images
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DatasetError(
            f"{paths['test_images']}: images are {test_images.shape[1]}×{test_images.shape[2]} but "
            f"{paths['train_images'].name} holds {train_images.shape[1]}×{train_images.shape[2]}; "
            "the four files must come from the same dataset"
        )
    return Dataset(
        kind=kind,
        path=str(directory),
        train=arrays["train"],
        test=arrays["test"],
        val=None,
        classes=classes,
        channels=1,
        image_size=(int(train_images.shape[1]), int(train_images.shape[2])),
        stats=OFFICIAL_STATS[kind],
    )


def open_mnist(path: Path) -> Dataset:
    return _open(path, "mnist", [str(i) for i in range(10)])


def open_fashion_mnist(path: Path) -> Dataset:
    return _open(path, "fashion-mnist", list(FASHION_MNIST_CLASSES))
