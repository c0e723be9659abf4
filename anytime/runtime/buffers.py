"""Host buffers kept between batches: where early exit copies the rows that go on to the next stage.

Compacting a batch copies the state tensors of the rows that go on (up to 784 KB a row for msdnet-cifar10).
Copied into new arrays each time, that is fresh memory every batch, and fresh memory is slow: on the
development VM filling new arrays ran at 0.5 GB/s against 4-11 GB/s into arrays used before (page faults
on memory the OS has to hand over again), and the copies took an eighth of msdnet-cifar10's time at batch
256. A `BufferPool` keeps one set of arrays per stage for the next batch or scheduler instead.

Ownership: `take` hands a set out and forgets it, `give_back` keeps it again, so two batches or schedulers
in flight on one executor (threads) never share arrays; a caller that fails midway just drops what it took.
The pool keeps at most one set per stage, the largest asked for, so what stays held is about one batch
of every stage's state (`held_bytes`; `clear()` frees it).
"""

from __future__ import annotations

import threading

import numpy as np

Buffers = dict[str, np.ndarray]


class BufferPool:
    """Per-stage sets of row buffers (state name -> array of `capacity` rows), lent out and given back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, Buffers] = {}

    def take(self, stage: int, rows: int, like: Buffers) -> Buffers:
        """Buffers of at least `rows` rows shaped like `like`'s tensors (row shape and dtype): the kept set
        when it fits, else a new one. Slice `[:rows]` to use them."""
        with self._lock:
            kept = self._free.pop(stage, None)
        if kept is not None and kept.keys() == like.keys():
            if all(
                b.shape[0] >= rows and b.shape[1:] == like[n].shape[1:] and b.dtype == like[n].dtype
                for n, b in kept.items()
            ):
                return kept
        return {name: np.empty((rows, *v.shape[1:]), v.dtype) for name, v in like.items()}

    def give_back(self, stage: int, buffers: Buffers) -> None:
        """Keep `buffers` for the next `take` of this stage, unless a larger set is already kept."""
        size = sum(b.nbytes for b in buffers.values())
        with self._lock:
            kept = self._free.get(stage)
            if kept is None or sum(b.nbytes for b in kept.values()) <= size:
                self._free[stage] = buffers

    def clear(self) -> None:
        with self._lock:
            self._free.clear()

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for buffers in self._free.values() for b in buffers.values())


def copy_rows(source: np.ndarray, rows: np.ndarray | slice | None, target: np.ndarray) -> None:
    """Copy `source[rows]` (all of it for None) into `target`, which has exactly that many rows."""
    if isinstance(rows, np.ndarray):
        # mode="raise" (the default) with out= copies through a temporary: 10x slower measured.
        np.take(source, rows, axis=0, out=target, mode="clip")
    else:
        target[...] = source if rows is None else source[rows]
