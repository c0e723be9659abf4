"""`npz:PATH` — one .npz file with x_train, y_train, x_test, y_test (and optionally x_val, y_val, classes)."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from anytime.data.base import FASHION_MNIST_CLASSES, ArraySplit, Dataset
from anytime.errors import DatasetError

LAYOUT = "expected x_train, y_train, x_test, y_test (uint8 N×H×W or N×H×W×C, integer labels), optional classes"
REQUIRED = ("x_train", "y_train", "x_test", "y_test")


def as_nhwc(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 N×H×W×C from N×H×W or N×H×W×C; clear errors for float data or channels-first arrays."""
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.integer) and x.size and x.min() >= 0 and x.max() <= 255:
            x = x.astype(np.uint8)
        else:
            raise DatasetError(
                f"{where}: images have dtype {x.dtype}; expected uint8 pixels 0..255 "
                "(convert with (x * 255).round().astype('uint8') if they are floats in [0, 1])"
            )
    if x.ndim == 3:
        return x[..., None]
    if x.ndim == 4:
        if x.shape[-1] in (1, 3):
            return x
        if x.shape[1] in (1, 3):
            raise DatasetError(
                f"{where}: images have shape {x.shape}, which looks channels-first (N×C×H×W); "
                "expected N×H×W×C: save x.transpose(0, 2, 3, 1)"
            )
    raise DatasetError(f"{where}: images have shape {x.shape}; expected N×H×W or N×H×W×C with C = 1 or 3")


def as_labels(y: np.ndarray, n_images: int, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{where}: labels have dtype {y.dtype} and shape {y.shape}; expected a 1-D integer array")
    if len(y) != n_images:
        raise DatasetError(f"{where}: {len(y)} labels for {n_images} images; expected one label per image")
    if y.size and y.min() < 0:
        raise DatasetError(f"{where}: negative label {int(y.min())}; expected class indices 0..N-1")
    return y.astype(np.int64)


def check_label_range(labels: list[np.ndarray], classes: list[str], where: str) -> None:
    top = max((int(y.max()) for y in labels if y.size), default=-1)
    if top >= len(classes):
        raise DatasetError(
            f"{where}: label {top} but only {len(classes)} class names; expected labels 0..{len(classes) - 1}"
        )


def default_class_names(path: Path, num_classes: int) -> list[str]:
    """Fashion-MNIST names when the file name says so (nothing else in the file tells), else "0".."N-1"."""
    if num_classes == len(FASHION_MNIST_CLASSES) and "fashion" in path.name.lower():
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(num_classes)]


def open_npz(path: Path) -> Dataset:
    where = f"npz:{path}"
    if not path.is_file():
        raise DatasetError(f"{where}: file not found; {LAYOUT}")
    arrays: dict[str, np.ndarray] | None = None
    try:
        # Opened here so that the file is closed whatever np.load returns or raises.
        with open(path, "rb") as fh:
            archive = np.load(fh, allow_pickle=False)
            if isinstance(archive, np.lib.npyio.NpzFile):  # else a .npy file: one array, no names
                with archive:
                    arrays = {k: archive[k] for k in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as exc:
        # zlib.error: a damaged member of a compressed archive (np.savez_compressed)
        raise DatasetError(f"{where}: not a readable .npz file ({exc}); {LAYOUT}") from exc
    if arrays is None:
        raise DatasetError(f"{where}: a single .npy array, not a .npz archive of named arrays; {LAYOUT}")
    for key in REQUIRED:
        if key not in arrays:
            found = ", ".join(sorted(arrays)) or "none"
            raise DatasetError(f"{where}: missing array '{key}'; {LAYOUT} (found: {found})")
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise DatasetError(f"{where}: has only one of x_val / y_val; a validation split needs both")

    splits = {}
    for name in ("train", "val", "test"):
        if f"x_{name}" not in arrays:
            continue
        x = as_nhwc(arrays[f"x_{name}"], f"{where}: x_{name}")
        y = as_labels(arrays[f"y_{name}"], len(x), f"{where}: y_{name}")
        splits[name] = (x, y)
    shapes = {name: x.shape[1:] for name, (x, _) in splits.items()}
    if len(set(shapes.values())) > 1:
        raise DatasetError(f"{where}: splits have different image shapes {shapes}; expected the same H×W×C")
    if len(splits["train"][0]) == 0:
        raise DatasetError(f"{where}: x_train is empty; expected at least one training image")

    labels = [y for _, y in splits.values()]
    if "classes" in arrays:
        classes_arr = arrays["classes"]
        if classes_arr.ndim != 1 or classes_arr.dtype.kind not in "UST":
            raise DatasetError(f"{where}: 'classes' has dtype {classes_arr.dtype}; expected a 1-D array of strings")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in classes_arr.tolist()]
        check_label_range(labels, classes, where)
    else:
        num_classes = max(int(y.max()) for y in labels if y.size) + 1
        classes = default_class_names(path, num_classes)

    train_x, _ = splits["train"]
    return Dataset(
        kind="npz",
        path=str(path),
        train=ArraySplit(*splits["train"]),
        test=ArraySplit(*splits["test"]),
        val=ArraySplit(*splits["val"]) if "val" in splits else None,
        classes=classes,
        channels=int(train_x.shape[-1]),
        image_size=(int(train_x.shape[1]), int(train_x.shape[2])),
    )
