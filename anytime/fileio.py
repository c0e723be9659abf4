"""Atomic file writes (temporary file in the same directory, fsync, rename). Torch-free."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from anytime.errors import OutputError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` so that `path` holds either its old content or all of the new, never a part."""
    with atomic_output(path, "wb") as fh:
        fh.write(data)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """An open temporary file that becomes `path` only when the block ends without an error.

    For outputs written piece by piece (streamed prediction rows): a run that fails or is interrupted
    leaves no half-written file under the final name, and an earlier file there stays as it was.
    """
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        # mkstemp creates owner-only files; give the result the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.replace(tmp, path)
        except IsADirectoryError as exc:
            raise _cannot_write(path, exc) from exc
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def check_writable(path: str | os.PathLike) -> None:
    """Raise the one-line OutputError now if `path` could not be written, before minutes of work go into it."""
    path = Path(path)
    if path.is_dir():
        raise _cannot_write(path, IsADirectoryError(path))
    fd, tmp = _temp_beside(path)
    os.close(fd)
    os.unlink(tmp)


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in `path`'s directory (made if missing): (descriptor, name), or the OutputError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from exc


def _cannot_write(path: Path, exc: OSError) -> OutputError:
    """The one-line error for an output that cannot be created where it was asked for."""
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        reason = f"'{blocker}' is a file, not a directory"
    elif path.is_dir():
        reason = "it is a directory"
    else:
        reason = f"{exc.strerror or exc} in '{path.parent}'"
    return OutputError(f"cannot write '{path}': {reason}; give an output path in a writable directory")
