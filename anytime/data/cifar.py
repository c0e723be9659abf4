"""`cifar10:PATH`, `cifar100:PATH` — the official "python version" pickles.

PATH may be the extracted folder (cifar-10-batches-py/, cifar-100-python/), the folder containing it,
or the .tar.gz as distributed (members are read from the archive in memory, nothing is extracted).
The pickles are read with an unpickler that only rebuilds numpy arrays, so a doctored file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from anytime.data.base import OFFICIAL_STATS, ArraySplit, Dataset
from anytime.errors import DatasetError


class _ArrayUnpickler(pickle.Unpickler):
    # What numpy arrays need (numpy 1 and 2 module paths), plus _codecs.encode, which Python 3 uses
    # for bytes in protocol-2 pickles; anything else is refused.
    ALLOWED = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        # The official files are Python 2 pickles with byte-string keys.
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # pickle raises many types on damaged input
        raise DatasetError(f"{where}: not a readable CIFAR pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _member_reader(path: Path, folder: str, layout: str) -> tuple[Callable[[str], bytes], str, Callable[[], None]]:
    """A function reading a member file by name, the description of where, and a close function."""
    if path.is_file():
        try:
            archive = tarfile.open(path, "r:*")
        except (tarfile.TarError, OSError) as exc:
            raise DatasetError(f"{path}: not a readable tar archive ({exc}); expected {layout}") from exc
        # A truncated or damaged download fails while members are listed or read (gzip raises EOFError,
        # which click would report as a bare "Aborted."), not when the archive is opened.
        damaged = (tarfile.TarError, OSError, EOFError, zlib.error)
        try:
            members = {m.name.lstrip("./"): m for m in archive.getmembers() if m.isfile()}
        except damaged as exc:
            archive.close()
            raise DatasetError(f"{path}: damaged or truncated archive ({exc}); download it again") from exc

        def read(name: str) -> bytes:
            for candidate in (f"{folder}/{name}", name):
                if candidate in members:
                    try:
                        fh = archive.extractfile(members[candidate])
                        assert fh is not None
                        return fh.read()
                    except damaged as exc:
                        raise DatasetError(
                            f"{path}: member {candidate} is damaged or truncated ({exc}); download the archive again"
                        ) from exc
            raise DatasetError(f"{path}: archive has no member {folder}/{name}; expected {layout}")

        return read, str(path), archive.close

    root = path
    if not (root / _first_member(folder)).exists():
        if (path / folder).is_dir():
            root = path / folder
        else:
            tarball = path / f"{folder.replace('-batches-py', '-python')}.tar.gz"
            if tarball.is_file():
                return _member_reader(tarball, folder, layout)
            raise DatasetError(f"{path}: no CIFAR files found; expected {layout}")

    def read_file(name: str) -> bytes:
        file = root / name
        if not file.is_file():
            raise DatasetError(f"{file}: file not found; expected {layout}")
        return file.read_bytes()

    return read_file, str(root), lambda: None


def _first_member(folder: str) -> str:
    return "batches.meta" if folder == "cifar-10-batches-py" else "meta"


def _images(batch: dict, where: str) -> np.ndarray:
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise DatasetError(f"{where}: 'data' has shape {shape}; expected N×3072 uint8 (3×32×32 planes per row)")
    # Rows hold the R, G and B planes one after the other: N×3×32×32 -> N×32×32×3.
    return np.ascontiguousarray(data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _labels(batch: dict, key: str, n: int, where: str) -> np.ndarray:
    if key not in batch:
        raise DatasetError(f"{where}: missing key '{key}'; expected 'data' and '{key}'")
    labels = np.asarray(batch[key], dtype=np.int64)
    if labels.shape != (n,):
        raise DatasetError(f"{where}: {labels.shape} labels for {n} images")
    return labels


def _names(meta: dict, key: str, where: str) -> list[str]:
    if key not in meta:
        raise DatasetError(f"{where}: missing key '{key}' in the meta file")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]


def _open(path: Path, kind: str, folder: str, meta_name: str, names_key: str, label_key: str,
          train_members: list[str], test_member: str) -> Dataset:  # fmt: skip
    layout = f"{folder}/ with {meta_name}, {', '.join(train_members)}, {test_member} (or the .tar.gz holding it)"
    read, where, close = _member_reader(path, folder, layout)
    try:
        classes = _names(_unpickle(read(meta_name), f"{where}/{meta_name}"), names_key, f"{where}/{meta_name}")
        parts = []
        for member in [*train_members, test_member]:
            batch = _unpickle(read(member), f"{where}/{member}")
            images = _images(batch, f"{where}/{member}")
            parts.append((images, _labels(batch, label_key, len(images), f"{where}/{member}")))
    finally:
        close()
    train_x = np.concatenate([x for x, _ in parts[:-1]])
    train_y = np.concatenate([y for _, y in parts[:-1]])
    test_x, test_y = parts[-1]
    top = max(int(train_y.max(initial=-1)), int(test_y.max(initial=-1)))
    if top >= len(classes) or min(int(train_y.min(initial=0)), int(test_y.min(initial=0))) < 0:
        raise DatasetError(f"{where}: labels outside 0..{len(classes) - 1} for {len(classes)} classes")
    return Dataset(
        kind=kind,
        path=str(path),
        train=ArraySplit(train_x, train_y),
        test=ArraySplit(test_x, test_y),
        val=None,
        classes=classes,
        channels=3,
        image_size=(32, 32),
        stats=OFFICIAL_STATS[kind],
    )


def open_cifar10(path: Path) -> Dataset:
    return _open(path, "cifar10", "cifar-10-batches-py", "batches.meta", "label_names", "labels",
                 [f"data_batch_{i}" for i in range(1, 6)], "test_batch")  # fmt: skip


def open_cifar100(path: Path) -> Dataset:
    return _open(path, "cifar100", "cifar-100-python", "meta", "fine_label_names", "fine_labels",
                 ["train"], "test")  # fmt: skip
