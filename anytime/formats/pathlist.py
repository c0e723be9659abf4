"""Path lists: a Parquet or JSONL file that names the images to classify, one per row.

`anytime serve` takes such a file wherever it takes images: collections of millions of files are listed
once (by whatever built the collection) rather than walked. The paths are taken as written: absolute, or
relative to the current directory (on a Ray cluster, to each worker's).

- Parquet: the column `path`, or the only column of the file (strings).
- JSONL: one JSON object per line with a `path` key (or a single key), or one JSON string per line.

This module owns the format; `anytime.ray` reads the same files with Ray Data, with the same column rule.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from anytime.errors import ConfigError, require

PATH_COLUMN = "path"
PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})


def is_path_list(arg: str | os.PathLike) -> bool:
    """A Parquet or JSONL file (by its suffix) that exists: a list of inputs rather than an input."""
    path = Path(arg)
    return path.suffix.lower() in PARQUET_SUFFIXES | JSONL_SUFFIXES and path.is_file()


def list_format(path: str | os.PathLike) -> str:
    return "parquet" if Path(path).suffix.lower() in PARQUET_SUFFIXES else "jsonl"


def path_column(columns: Sequence[str], source: str | os.PathLike) -> str:
    """The column that holds the paths: `path`, or the only one."""
    names = list(columns)
    if PATH_COLUMN in names:
        return PATH_COLUMN
    if len(names) == 1:
        return names[0]
    raise ConfigError(
        f"{source}: a path list needs a column named '{PATH_COLUMN}' (or a single column); it has {names}"
    )


def import_parquet(purpose: str):
    """pyarrow.parquet, or a one-line error naming the extra that installs pyarrow."""
    require("pyarrow", "parquet", purpose)
    import pyarrow.parquet as pq

    return pq


def read_path_list(path: str | os.PathLike) -> Iterator[str]:
    """The paths a list file names, in file order, read lazily (a batch of rows at a time)."""
    if list_format(path) == "parquet":
        yield from _read_parquet(path)
    else:
        yield from _read_jsonl(path)


def open_parquet(path: str | os.PathLike) -> Any:
    """A path list's pyarrow.parquet.ParquetFile, or a one-line error for a damaged or non-Parquet file."""
    pq = import_parquet(f"Reading the path list {path}")

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for damaged or non-Parquet files
        raise ConfigError(f"{path}: not a readable Parquet file ({exc})") from exc


def _read_parquet(path: str | os.PathLike) -> Iterator[str]:
    reader = open_parquet(path)
    column = path_column(reader.schema_arrow.names, path)
    for batch in reader.iter_batches(columns=[column]):
        for value in batch.column(0).to_pylist():
            if value is None or not isinstance(value, str):
                raise ConfigError(f"{path}: column '{column}' holds {value!r}; every row must be a path (a string)")
            yield value


def _read_jsonl(path: str | os.PathLike) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(_utf8_lines(fh, path), 1):
            line = line.strip()
            if not line:
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}, line {number}: not JSON ({exc.msg})") from exc
            if isinstance(value, dict):
                value = value[path_column(list(value), f"{path}, line {number}")]
            if not isinstance(value, str):
                raise ConfigError(f"{path}, line {number}: {value!r} is not a path (a string)")
            yield value


def _utf8_lines(fh: TextIO, path: str | os.PathLike) -> Iterator[str]:
    """The lines of a text file opened as UTF-8; bytes that are not UTF-8 are a ConfigError, not a traceback."""
    try:
        yield from fh
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason}); a JSONL path list is UTF-8") from exc
