"""`imagefolder:DIR` — one sub-directory per class, any image pillow reads, decoded lazily.

With `train/` (and optionally `val/`, `test/`) sub-directories those are the splits; otherwise the
whole folder is the training split. Class names are the sorted sub-directory names of the training
split; val/test may hold a subset of them. Only file paths are held in memory, so ImageNet-sized
folders open in seconds.

Images are converted to one colour mode for the whole dataset: "L" when every sampled image is grey,
else "RGB" (grey images are then replicated to three channels, alpha is dropped).
"""

from __future__ import annotations

import logging
import os
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from anytime.data.base import Dataset, Split, stats_from_histograms
from anytime.errors import DatasetError, InputImageError
from anytime.formats.preprocessing import GREY_MODES, decode_file, to_color

logger = logging.getLogger(__name__)

SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
SIZE_SCAN_LIMIT = 4096  # headers read to learn a common image size; beyond this, image_size is None
MODE_SAMPLE = 256  # images whose header decides "L" or "RGB" in larger folders
STATS_SAMPLE = 200  # images decoded (reduced) to estimate mean/std
STATS_DRAFT_SIDE = 64
LAYOUT = "expected DIR/CLASS/IMAGE files, or DIR/train/CLASS/... with optional DIR/val/ and DIR/test/"


def image_extensions() -> set[str]:
    Image.init()  # registers every plugin, so all formats pillow can read are listed
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


class ImageFolderSplit(Split):
    """Paths and labels; images are decoded on access and converted to the dataset's mode."""

    in_memory = False

    def __init__(self, paths: list[str], labels: np.ndarray, mode: str) -> None:
        self.paths = paths
        self.labels = labels
        self.mode = mode

    def image(self, i: int) -> np.ndarray:
        # The one decoder (anytime.formats.preprocessing): EXIF orientation, 16-bit scaling, colour, as served.
        try:
            return decode_file(self.paths[i], self.mode)
        except InputImageError as exc:
            raise DatasetError(f"{exc}; remove or replace the file") from exc


def _is_image(name: str, extensions: set[str]) -> bool:
    """A file name that is not hidden and has an image suffix pillow reads."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions


def _scan_classes(directory: Path, extensions: set[str], where: str) -> dict[str, list[str]]:
    classes: dict[str, list[str]] = {}
    loose = 0
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_file() and _is_image(entry.name, extensions):
            loose += 1
        if entry.is_dir() and not entry.name.startswith("."):
            files: list[str] = []
            # Symbolic links are followed, but no directory is read twice: a link back up the tree (a -> .)
            # would otherwise list the same images again at every level until the OS gives up (ELOOP).
            seen = {os.path.realpath(entry.path)}
            for root, dirs, names in os.walk(entry.path, followlinks=True):
                # Hidden directories are skipped like hidden files and hidden class folders: .thumbnails/,
                # .ipynb_checkpoints/, a NAS's .@__thumb/ hold copies, not more training images.
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                real = {d: os.path.realpath(os.path.join(root, d)) for d in dirs}
                dirs[:] = sorted(d for d in dirs if real[d] not in seen)
                seen.update(real[d] for d in dirs)
                files.extend(os.path.join(root, n) for n in sorted(names) if _is_image(n, extensions))
            # NFC: macOS writes names decomposed (NFD), so the same class copied from there would not match.
            classes.setdefault(unicodedata.normalize("NFC", entry.name), []).extend(files)
    if loose:
        logger.warning(
            "%s: %d image file(s) lie directly in %s, outside any class folder; they are not used (move them "
            "into the folder of their class)",
            where,
            loose,
            directory,
        )
    return classes


def _evenly_spaced(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, num=min(n, k)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


# EXIF orientations that turn the image a quarter (decode_file applies them): height and width swap.
_QUARTER_TURNS = {5, 6, 7, 8}


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) of the image as decoded, i.e. after its EXIF orientation; from the header only."""
    # PNG's getexif() decodes all pixels to look for an eXIf chunk after the image data; one before it is
    # already in img.info, and that is where writers put it.
    exif = None if img.format == "PNG" and "exif" not in img.info else img.getexif()
    if exif is not None and exif.get(0x0112) in _QUARTER_TURNS:
        return img.width, img.height
    return img.height, img.width


def _headers(paths: list[str]) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for path in paths:
        try:
            with Image.open(path) as img:  # reads the header only
                out.append((img.mode, _oriented_size(img)))
        except (OSError, UnidentifiedImageError) as exc:
            raise DatasetError(f"{path}: cannot read image header ({exc}); remove or replace the file") from exc
    return out


def _estimate_stats(split: ImageFolderSplit) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from an evenly spaced sample of training images, decoded at reduced size (cheap)."""
    channels = 1 if split.mode == "L" else 3
    hist = np.zeros((channels, 256), np.int64)
    for i in _evenly_spaced(len(split), STATS_SAMPLE):
        path = split.paths[int(i)]
        try:
            with Image.open(path) as img:
                if img.mode in ("RGB", "L"):
                    img.draft(img.mode, (STATS_DRAFT_SIDE, STATS_DRAFT_SIDE))  # JPEG: decode at 1/2..1/8 scale
                small = to_color(img, split.mode, path)
                small.thumbnail((STATS_DRAFT_SIDE, STATS_DRAFT_SIDE))
                array = np.asarray(small).reshape(-1, channels)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DatasetError(f"{path}: cannot decode image ({exc}); remove or replace the file") from exc
        for c in range(channels):
            hist[c] += np.bincount(array[:, c], minlength=256)
    return stats_from_histograms(hist)


def open_imagefolder(path: Path) -> Dataset:
    where = f"imagefolder:{path}"
    if not path.is_dir():
        raise DatasetError(f"{where}: not a directory; {LAYOUT}")
    extensions = image_extensions()
    split_dirs: dict[str, Path] = {}
    # Split folders are recognised in any case (Train/, TEST/): read as classes, their names became the labels.
    subdirs: dict[str, Path] = {}
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_dir():
            subdirs.setdefault(entry.name.lower(), Path(entry.path))
    if "train" in subdirs:
        for split, names in SPLIT_DIRS.items():
            found = [subdirs[n] for n in names if n in subdirs]
            if len(found) > 1:
                raise DatasetError(
                    f"{where}: {' and '.join(f'{d.name}/' for d in found)} are {'both' if len(found) == 2 else 'all'} {split} splits; keep one "
                    "(move the images of the others into it)"
                )
            if found:
                split_dirs[split] = found[0]
    else:
        split_dirs["train"] = path

    scanned = {split: _scan_classes(d, extensions, where) for split, d in split_dirs.items()}
    classes = list(scanned["train"])
    if not classes:
        raise DatasetError(f"{where}: no class sub-directories in {split_dirs['train']}; {LAYOUT}")
    index = {name: i for i, name in enumerate(classes)}
    for name, files in scanned["train"].items():
        if not files:
            logger.warning("%s: class %r has no training images", where, name)

    entries: dict[str, tuple[list[str], np.ndarray]] = {}
    for split, by_class in scanned.items():
        unknown = sorted(set(by_class) - set(index))
        if unknown:
            raise DatasetError(
                f"{split_dirs[split]}: classes {unknown} have no folder in {split_dirs['train']}; "
                "every val/test class must also be a training class"
            )
        paths = [p for name in by_class for p in by_class[name]]
        labels = np.asarray([index[name] for name in by_class for _ in by_class[name]], dtype=np.int64)
        if split != "train" and not paths:
            logger.warning("%s: %s/ holds no images; treating the dataset as having no %s split", where, split, split)
            continue
        entries[split] = (paths, labels)
    if not entries["train"][0]:
        raise DatasetError(f"{where}: no image files found (extensions pillow reads, e.g. .png, .jpg); {LAYOUT}")

    train_paths = entries["train"][0]
    if len(train_paths) <= SIZE_SCAN_LIMIT:
        all_paths = [p for paths, _ in entries.values() for p in paths]
        headers = _headers(all_paths if len(all_paths) <= SIZE_SCAN_LIMIT else train_paths)
        sizes = {size for _, size in headers}
        image_size = sizes.pop() if len(sizes) == 1 else None
    else:
        headers = _headers([train_paths[int(i)] for i in _evenly_spaced(len(train_paths), MODE_SAMPLE)])
        image_size = None
    mode = "L" if all(m in GREY_MODES for m, _ in headers) else "RGB"

    splits = {name: ImageFolderSplit(paths, labels, mode) for name, (paths, labels) in entries.items()}
    return Dataset(
        kind="imagefolder",
        path=str(path),
        train=splits["train"],
        test=splits.get("test"),
        val=splits.get("val"),
        classes=classes,
        channels=1 if mode == "L" else 3,
        image_size=image_size,
        compute_stats=lambda: _estimate_stats(splits["train"]),
    )
