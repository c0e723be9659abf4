"""Datasets for training and evaluating multi-exit classifiers.

Readers (this package's top level) use numpy and pillow only, so the torch-free runtime and evaluation
can import `anytime.data` without torch:

    ds = open_dataset("npz:~/data/fashion-mnist.npz")   # KIND:PATH; kinds in anytime.data.KINDS
    ds.info                      # DatasetInfo(kind, path, num_classes, classes, channels, image_size, mean, std)
    image, label = ds.train[0]   # uint8 H×W×C numpy image, int label; also ds.test, ds.val (None if absent)
    train_idx, val_idx, record = split_train_val(ds, val_size=None, seed=0)   # record -> split.json
    train_idx, val_idx = restore_split(ds, record)
    val_images = val_split_images(ds, record)

The torch parts live in `anytime.data.loaders` and `anytime.data.transforms`. `make_loader` is also
available as `anytime.data.make_loader`, imported (with torch) only on first access:

    loader = make_loader(ds.train, train_idx, batch_size=128, train=True, mean=ds.info.mean,
                         std=ds.info.std, image_size=28, channels=1, seed=0, epoch=epoch)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anytime._lazy import lazy_getattr
from anytime.data.base import (
    FASHION_MNIST_CLASSES,
    OFFICIAL_STATS,
    ArraySplit,
    Dataset,
    DatasetInfo,
    IndexedSplit,
    Split,
)
from anytime.data.defaults import channel_stats, default_augmentation
from anytime.data.sources import KINDS, open_dataset, parse_spec
from anytime.data.split import (
    restore_split,
    split_train_val,
    train_split_images,
    val_split_images,
)
from anytime.formats.preprocessing import eval_preprocess

if TYPE_CHECKING:  # pragma: no cover
    from anytime.data.loaders import make_loader

__all__ = [
    "FASHION_MNIST_CLASSES",
    "KINDS",
    "OFFICIAL_STATS",
    "ArraySplit",
    "Dataset",
    "DatasetInfo",
    "IndexedSplit",
    "Split",
    "channel_stats",
    "default_augmentation",
    "eval_preprocess",
    "make_loader",
    "open_dataset",
    "parse_spec",
    "restore_split",
    "split_train_val",
    "train_split_images",
    "val_split_images",
]

_LAZY_TORCH = {"make_loader": "anytime.data.loaders"}


__getattr__ = lazy_getattr(__name__, _LAZY_TORCH)
