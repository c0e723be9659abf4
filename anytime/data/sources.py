"""`open_dataset("KIND:PATH")`: the one entry point to every dataset reader."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from anytime.data.base import Dataset
from anytime.errors import DatasetError

# kind -> (module, function, one-line layout); readers are imported only when their kind is opened.
KINDS: dict[str, tuple[str, str, str]] = {
    "cifar10": ("anytime.data.cifar", "open_cifar10", "cifar-10-batches-py/ directory or cifar-10-python.tar.gz"),
    "cifar100": ("anytime.data.cifar", "open_cifar100", "cifar-100-python/ directory or cifar-100-python.tar.gz"),
    "mnist": ("anytime.data.mnist", "open_mnist", "directory with train-images-idx3-ubyte[.gz] etc."),
    "fashion-mnist": ("anytime.data.mnist", "open_fashion_mnist", "directory with train-images-idx3-ubyte[.gz] etc."),
    "npz": ("anytime.data.npz", "open_npz", "file with x_train, y_train, x_test, y_test"),
    "imagefolder": (
        "anytime.data.imagefolder",
        "open_imagefolder",
        "one sub-directory per class, optional train/val/test",
    ),
}

ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "image-folder": "imagefolder",
    "folder": "imagefolder",
}


def kinds_help() -> str:
    return "; ".join(f"{k}:PATH ({layout})" for k, (_, _, layout) in KINDS.items())


def parse_spec(spec: str) -> tuple[str, Path]:
    """Split `KIND:PATH` into a known kind and an absolute path (~ expanded)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"dataset spec {spec!r} is empty; expected KIND:PATH, one of: {kinds_help()}")
    kind, sep, raw_path = spec.strip().partition(":")
    if sep and not raw_path.strip():
        raise DatasetError(f"dataset spec {spec!r} has no path after {kind}:; expected KIND:PATH, e.g. {kind}:data/")
    if not sep or not raw_path:
        hint = ""
        if spec.endswith(".npz"):
            hint = f" (did you mean 'npz:{spec}'?)"
        raise DatasetError(
            f"dataset spec {spec!r} has no KIND: prefix{hint}; expected KIND:PATH, one of: {kinds_help()}"
        )
    kind = ALIASES.get(kind.lower(), kind.lower())
    if kind not in KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r} in {spec!r}; known kinds: {', '.join(KINDS)}")
    path = Path(os.path.abspath(os.path.expanduser(raw_path)))
    return kind, path


def open_dataset(spec: str) -> Dataset:
    """Open `KIND:PATH` (kinds: cifar10, cifar100, mnist, fashion-mnist, npz, imagefolder)."""
    kind, path = parse_spec(spec)
    if not path.exists():
        raise DatasetError(f"{kind}:{path}: path does not exist; expected {KINDS[kind][2]}")
    module, func, _ = KINDS[kind]
    return getattr(importlib.import_module(module), func)(path)
