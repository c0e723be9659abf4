"""The reader-side data model: `DatasetInfo`, split sequences and `Dataset`. numpy only, no torch.

A split is a sequence of `(uint8 H×W×C image, int label)` pairs with `.labels` (int64) and
`get_batch(indices)`. In-memory splits (`ArraySplit`, and `IndexedSplit` views of them) set
`in_memory = True`; the loaders then augment whole batches as tensors instead of image by image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from anytime.errors import DatasetError

logger = logging.getLogger(__name__)

# Per-channel statistics of pixels scaled to [0, 1], as published with (or computed once on) the
# official training sets, so that every run of the same data normalises identically.
OFFICIAL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and its preprocessing need to know about a dataset."""

    kind: str
    path: str
    num_classes: int
    classes: list[str]
    channels: int
    image_size: tuple[int, int] | None  # (H, W); None when images vary in size (imagefolder)
    mean: tuple[float, ...]  # per channel, pixels scaled to [0, 1]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = None if self.image_size is None else list(self.image_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


class Split(Sequence):
    """Base of all splits: a sequence of `(uint8 H×W×C image, int label)`."""

    in_memory: bool = False
    labels: np.ndarray  # int64, one per image

    def __len__(self) -> int:
        return int(len(self.labels))

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a split of {n} images")
        return i % n if n else i

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return IndexedSplit(self, np.arange(len(self))[i])
        i = self._check_index(int(i))
        return self.image(i), int(self.labels[i])

    def image(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images `indices` stacked as uint8 N×H×W×C, and their int64 labels.

        Images of different sizes cannot be stacked; use a loader with an `image_size` for those.
        """
        idx = _as_indices(indices, len(self))
        images = [self.image(int(i)) for i in idx]
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise DatasetError(
                f"cannot stack images of different sizes {sorted(shapes)} into one batch; "
                "use anytime.data.make_loader(..., image_size=...) to resize and crop them"
            )
        if not images:
            return np.zeros((0, 0, 0, 0), np.uint8), np.zeros(0, np.int64)
        return np.stack(images), self.labels[idx].copy()


def _as_indices(indices: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        bad = idx[(idx < -n) | (idx >= n)][0]
        raise IndexError(f"index {int(bad)} out of range for a split of {n} images")
    return np.where(idx < 0, idx + n, idx)


class ArraySplit(Split):
    """Images held in one uint8 N×H×W×C array (npz, CIFAR, MNIST)."""

    in_memory = True

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"ArraySplit needs uint8 N×H×W×C images, got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)

    def image(self, i: int) -> np.ndarray:
        return self.images[i]

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = _as_indices(indices, len(self))
        return self.images[idx], self.labels[idx]


class IndexedSplit(Split):
    """A view of `base` restricted to `indices` (e.g. the validation hold-out of the training split)."""

    def __init__(self, base: Split, indices: Sequence[int] | np.ndarray) -> None:
        self.base = base
        self.indices = _as_indices(indices, len(base))
        self.labels = base.labels[self.indices]
        self.in_memory = base.in_memory

    def image(self, i: int) -> np.ndarray:
        return self.base.image(int(self.indices[i]))

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.base.get_batch(self.indices[_as_indices(indices, len(self))])


def pixel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of uint8 N×H×W×C pixels scaled to [0, 1], via 256-bin histograms.

    Histograms keep this exact and cheap (no float copy of the whole array).
    """
    hist = np.stack([np.bincount(images[..., c].ravel(), minlength=256) for c in range(images.shape[-1])])
    return stats_from_histograms(hist)


def stats_from_histograms(hist: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std per channel from a C×256 histogram of uint8 values."""
    values = np.arange(256, dtype=np.float64) / 255.0
    counts = hist.astype(np.float64)
    total = counts.sum(axis=1)
    if np.any(total == 0):
        raise DatasetError("cannot compute pixel statistics of an empty training split")
    mean = (counts * values).sum(axis=1) / total
    var = (counts * values**2).sum(axis=1) / total - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    # A constant image set has std 0; normalising by it would divide by zero.
    std = np.where(std > 1e-6, std, 1.0)
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


class Dataset:
    """A dataset opened by `open_dataset`: `.info`, `.spec` and the splits `.train`, `.test`, `.val`.

    `.test` and `.val` are None when the source has no such split. `.info` is computed on first
    access (pixel statistics may need a pass over the training split).
    """

    def __init__(
        self,
        *,
        kind: str,
        path: str,
        train: Split,
        test: Split | None,
        val: Split | None,
        classes: list[str],
        channels: int,
        image_size: tuple[int, int] | None,
        stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        compute_stats: Callable[[], tuple[tuple[float, ...], tuple[float, ...]]] | None = None,
    ) -> None:
        self.kind = kind
        self.path = path
        self.train = train
        self.test = test
        self.val = val
        self._classes = list(classes)
        self._channels = channels
        self._image_size = image_size
        self._stats = stats
        self._compute_stats = compute_stats
        self._info: DatasetInfo | None = None

    @property
    def spec(self) -> str:
        """The normalised `KIND:ABSOLUTE_PATH` string that reopens this dataset."""
        return f"{self.kind}:{self.path}"

    @property
    def info(self) -> DatasetInfo:
        if self._info is None:
            stats = self._stats
            if stats is None:
                if self._compute_stats is None:
                    stats = pixel_stats_of_split(self.train)
                else:
                    stats = self._compute_stats()
                logger.debug("pixel statistics of %s: mean=%s std=%s", self.spec, *stats)
            self._info = DatasetInfo(
                kind=self.kind,
                path=self.path,
                num_classes=len(self._classes),
                classes=list(self._classes),
                channels=self._channels,
                image_size=self._image_size,
                mean=tuple(stats[0]),
                std=tuple(stats[1]),
            )
        return self._info

    def splits(self) -> dict[str, Split]:
        """The splits the source has, by name."""
        named = {"train": self.train, "val": self.val, "test": self.test}
        return {k: v for k, v in named.items() if v is not None}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits().items())
        return f"Dataset({self.spec!r}, classes={len(self._classes)}, {sizes})"


def pixel_stats_of_split(split: Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if isinstance(split, ArraySplit):
        return pixel_stats(split.images)
    images, _ = split.get_batch(np.arange(len(split)))
    return pixel_stats(images)
