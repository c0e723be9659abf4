"""Turning what a user passes (paths, directories, globs, `-` for stdin, images, arrays) into a lazy
stream of inputs, with true labels when files sit in class-named folders."""

from __future__ import annotations

import glob
import os
import re
import sys
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image

from anytime.errors import ConfigError
from anytime.formats.pathlist import is_path_list, read_path_list
from anytime.formats.preprocessing import is_binary_file

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class InputItem:
    """One input: what to read (a path, PIL image or array), a name for rows, the true label if known."""

    source: Any
    name: str | None
    true_label: int = -1


class MissingInput:
    """A command-line argument that matched nothing; it becomes an error row."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason


def _normalise_class(name: str) -> str:
    # NFKD first: an accented letter, composed (NFC) or decomposed (NFD, as macOS writes names), keeps its base.
    return re.sub(r"[^0-9a-z]+", "", unicodedata.normalize("NFKD", name).lower())


class ClassFolders:
    """Maps a file's parent folder name to a class index (exact, normalised, or the class number)."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.exact = {unicodedata.normalize("NFC", c): i for i, c in enumerate(classes)}
        self.loose: dict[str, int] = {}
        for i, c in enumerate(classes):
            self.loose.setdefault(_normalise_class(c), i)
        numeric_names = any(c.isdigit() for c in classes)
        self.by_number = {} if numeric_names else {str(i): i for i in range(len(classes))}

    def label(self, path: str | os.PathLike) -> int:
        return self.index(Path(path).parent.name)

    def index(self, folder: str) -> int:
        """The class a folder (or a data set's class) named `folder` stands for; -1 when none."""
        folder = unicodedata.normalize("NFC", folder)
        if folder in self.exact:
            return self.exact[folder]
        if folder in self.by_number:
            return self.by_number[folder]
        loose = _normalise_class(folder)
        return self.loose.get(loose, -1) if loose else -1


def _walk_images(directory: Path) -> Iterator[Path]:
    """Image files under a directory, recursively, in a stable (sorted) order, lazily."""
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for f in sorted(files):
            if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith("."):
                yield Path(root) / f


def expand_paths(args: Iterable[str], stdin: TextIO | None = None) -> Iterator[Path | MissingInput]:
    """Files as given; directories recursively (image suffixes only); globs; `-`: one path per stdin line;
    a Parquet or JSONL path list (anytime.formats.pathlist): the files it names."""
    for arg in args:
        if arg != "-" and is_path_list(arg):
            yield from (Path(p) for p in read_path_list(arg))
            continue
        if arg == "-":
            stream = stdin if stdin is not None else sys.stdin
            for line in stream:
                line = line.strip()
                if line:
                    yield from expand_paths([line])
            continue
        path = Path(arg).expanduser()
        if path.is_dir():
            yield from _walk_images(path)
        elif path.exists() or path.is_symlink():
            yield path
        elif _GLOB_CHARS.search(arg):
            yield from _glob(arg)
        else:
            yield MissingInput(arg, f"{arg}: file not found")


def _glob(pattern: str) -> Iterator[Path | MissingInput]:
    """The files a glob pattern matches (folders among them: their images), or one MissingInput."""
    matches = sorted(glob.iglob(str(Path(pattern).expanduser()), recursive=True))
    if not matches:
        yield MissingInput(pattern, f"{pattern}: no file matches this pattern")
    for m in matches:
        mp = Path(m)
        if mp.is_dir():
            yield from _walk_images(mp)
        else:
            yield mp


def is_one_path(path: str | os.PathLike) -> bool:
    """A path that stands for one input (a file, or a missing one), not a folder, glob pattern or path list."""
    p = Path(path).expanduser()
    if p.is_dir() or is_path_list(p):
        return False
    return p.exists() or p.is_symlink() or not _GLOB_CHARS.search(os.fspath(path))


def iter_input_items(inputs: Any, classes: Sequence[str] | None = None) -> Iterator[InputItem]:
    """Normalise `predict`'s argument to a lazy stream of InputItems.

    A path, taken as `anytime serve` takes its INPUTS (a folder: its images, recursively; a glob pattern: the
    files it matches; a Parquet or JSONL path list: the files it names), PIL image, encoded image bytes (or a binary file object
    holding them), H×W[×C] array or N×H×W×C array, or any iterable of those (consumed lazily).
    """
    folders = ClassFolders(classes) if classes is not None else None

    def from_path(p: str | os.PathLike) -> InputItem:
        label = folders.label(p) if folders is not None else -1
        return InputItem(os.fspath(p), os.fspath(p), label)

    def from_arg(arg: str | os.PathLike) -> Iterator[InputItem]:
        """As `expand_paths` takes an argument, keeping a file's path as written for its row."""
        text = os.fspath(arg)
        if text == "-":  # standard input is the command line's; here it is a file named "-"
            yield from_path(arg)
            return
        given = Path(text).expanduser()
        for item in expand_paths([text]):
            if isinstance(item, MissingInput):
                yield InputItem(item, item.name)
            else:
                yield from_path(arg if item == given else item)

    if isinstance(inputs, (str, os.PathLike)):
        yield from from_arg(inputs)
        return
    if isinstance(inputs, (Image.Image, bytes, bytearray, memoryview)) or is_binary_file(inputs):
        # one image: encoded bytes are not a list of ints, nor a file object a list of lines
        yield InputItem(inputs, _file_name(inputs))
        return
    if isinstance(inputs, np.ndarray):
        if inputs.ndim == 4:
            for i in range(inputs.shape[0]):
                yield InputItem(inputs[i], None)
        else:
            yield InputItem(inputs, None)
        return
    if isinstance(inputs, InputItem):
        yield inputs
        return
    if inputs is None or not isinstance(inputs, Iterable):
        raise ConfigError(
            f"cannot classify an input of type {type(inputs).__name__}; give a path, a PIL image, encoded image "
            "bytes, a uint8 H×W×C or N×H×W×C numpy array, or a list or iterator of these"
        )
    for item in inputs:
        if isinstance(item, InputItem):
            yield item
        elif isinstance(item, MissingInput):
            yield InputItem(item, item.name)
        elif isinstance(item, (str, os.PathLike)):
            yield from from_arg(item)
        else:
            yield InputItem(item, _file_name(item))


def _file_name(item: Any) -> str | None:
    """The path a file object was opened from (its rows' path), None for other inputs."""
    name = getattr(item, "name", None) if is_binary_file(item) else None
    return name if isinstance(name, str) else None
