"""The refilling stage scheduler: early exit over a stream, every stage run on full batches.

Per-batch compaction (`StageExecutor.run_early_exit`) runs later stages on the few rows of each batch that
did not exit (at a 50% budget the last stage of a 64-row batch gets about 7 rows, at a higher time per
row). Over a stream, `RefillingScheduler` instead gives each stage a queue of waiting rows: their input ids
and the state tensors that enter the stage. A stage runs when its queue holds `batch_size` rows, on
exactly those rows; the rows that do not exit go on to the next stage's queue. When the stream ends
(`finish`) every queue is run on what it holds, first stage first.

Bounds (what `StageCalls` instruments and the tests check):
- a queue never holds more than `batch_size` rows: rows enter it in pieces, and it runs as soon as it is
  full, so the state tensors waiting at stage k take at most `batch_size` rows of stage k's state;
- no input waits while more than `max_wait_rows` later inputs are admitted: when the oldest unanswered
  input is that far behind, the stage that holds it runs on what it holds even if not full (and the next
  one, until it is answered). With ordered output the answered rows waiting for an earlier input (the
  reorder buffer: a label, a confidence, an exit and the caller's per-input fields) are therefore at most
  `max_wait_rows + batch_size`; the price of order is that memory and the wait of early answers, not
  computation: the stage calls are the same in both orders.
- the queue buffers (`batch_size` rows of each stage's state) outlive the scheduler: `finish()` leaves them
  in the executor's `queue_buffers` (`anytime.runtime.buffers.BufferPool`) for the next scheduler, so at
  most (K-1) x batch_size rows of state stay held (1.2 GB for msdnet-cifar10 at batch 256, 4 MB for
  msdnet-tiny at 64). Fresh memory is slow: a scheduler per call over 512 msdnet-cifar10 images spent a
  quarter of its time filling new buffers. `executor.free_buffers()` hands them back.
Each input is answered by exactly the stages the per-batch executor would run for it, with the same
thresholds, so answers are identical; only which rows share a stage call differs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anytime.errors import ConfigError
from anytime.runtime.buffers import BufferPool, copy_rows
from anytime.runtime.calibration import softmax_confidence

DEFAULT_WAIT_BATCHES = 16  # max_wait_rows defaults to this many batches


@dataclass
class StageCalls:
    """Every stage call of a run: rows and seconds of each call, per stage (a benchmark hook for batch fill).

    Filled by the refilling scheduler and, batch by batch, by the per-batch executor (pass one as
    `predict(..., stage_calls=...)`). `max_queued_rows` and `max_held_rows` are the scheduler's bounds as
    reached: the most rows a stage's queue held, and the most inputs admitted but not yet released.
    """

    num_stages: int
    rows: list[list[int]] = field(default_factory=list)
    seconds: list[list[float]] = field(default_factory=list)
    max_queued_rows: list[int] = field(default_factory=list)
    max_held_rows: int = 0

    def __post_init__(self) -> None:
        self.rows = self.rows or [[] for _ in range(self.num_stages)]
        self.seconds = self.seconds or [[] for _ in range(self.num_stages)]
        self.max_queued_rows = self.max_queued_rows or [0] * self.num_stages

    def add(self, stage: int, rows: int, seconds: float) -> None:
        self.rows[stage].append(int(rows))
        self.seconds[stage].append(float(seconds))

    @property
    def calls(self) -> list[int]:
        return [len(r) for r in self.rows]

    @property
    def rows_per_stage(self) -> list[int]:
        return [sum(r) for r in self.rows]

    def mean_rows_per_call(self) -> list[float]:
        return [sum(r) / len(r) if r else 0.0 for r in self.rows]

    def fill(self, batch_size: int) -> list[float]:
        """Mean rows per call over `batch_size`, per stage: 1.0 is every call on a full batch."""
        return [m / batch_size for m in self.mean_rows_per_call()]

    def seconds_per_row(self) -> list[float]:
        return [sum(s) / sum(r) if sum(r) else 0.0 for s, r in zip(self.seconds, self.rows)]


@dataclass
class Answered:
    """Answers for some inputs of one admitted batch: positions in that batch, and their results.

    `exits` are 0-based; -1 marks an input that never ran (an error row of the caller's). With ordered
    output each `Answered` is a whole batch (`rows` = 0..n-1), released in admission order.
    """

    payload: Any
    rows: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray
    exits: np.ndarray


class _Admitted:
    """One admitted batch: its answers so far and how many of its decoded inputs are still running."""

    __slots__ = ("first_id", "payload", "labels", "confidence", "exits", "remaining")

    def __init__(self, first_id: int, n: int, running: int, payload: Any) -> None:
        self.first_id = first_id
        self.payload = payload
        self.labels = np.full(n, -1, dtype=np.int64)
        self.confidence = np.zeros(n, dtype=np.float32)
        self.exits = np.full(n, -1, dtype=np.int64)
        self.remaining = running


Rows = np.ndarray | slice | None  # which rows of a state to queue: indices, a slice, or all


class _HostQueue:
    """Rows waiting for one stage on the host: one buffer of `capacity` rows per state tensor, kept between
    schedulers (the executor's `queue_buffers`).

    Rows are copied straight into the buffer (compaction and queueing in one copy, as much copying as
    per-batch compaction does), and a full batch arriving at an empty queue is queued without a copy.
    """

    def __init__(self, capacity: int, pool: BufferPool, stage: int) -> None:
        self.capacity = capacity
        self.rows = 0
        self._pool = pool
        self._stage = stage
        self._ids = np.empty(capacity, dtype=np.int64)
        self._buffers: dict[str, np.ndarray] | None = None
        self._whole: dict[str, np.ndarray] | None = None  # a full batch queued as it came

    def put(self, ids: np.ndarray, state: dict[str, np.ndarray], rows: Rows) -> None:
        n = ids.size
        if self.rows == 0 and n == self.capacity and rows is None:
            self._whole = state
        else:
            if self._buffers is None:
                self._buffers = self._pool.take(self._stage, self.capacity, state)
            for name, value in state.items():
                copy_rows(value, rows, self._buffers[name][self.rows : self.rows + n])
        self._ids[self.rows : self.rows + n] = ids
        self.rows += n

    @property
    def head(self) -> int:
        return int(self._ids[0])

    def take_all(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The queued ids and state; the state is a view of the buffers, valid until the next `put`."""
        ids = self._ids[: self.rows].copy()
        if self._whole is not None:
            state, self._whole = self._whole, None
        else:
            assert self._buffers is not None
            state = {name: buffer[: self.rows] for name, buffer in self._buffers.items()}
        self.rows = 0
        return ids, state

    def release(self) -> None:
        """Give the buffers back for the next scheduler (only once nothing refers to their rows)."""
        if self._buffers is not None:
            self._pool.give_back(self._stage, self._buffers)
            self._buffers = None


class _DeviceQueue:
    """Rows waiting for one stage on the device: chunks of `OrtValue` states, joined when the stage runs."""

    def __init__(self, executor: Any, stage: int) -> None:
        self.executor = executor
        self.stage = stage
        self.rows = 0
        self._ids: list[np.ndarray] = []
        self._states: list[dict[str, Any]] = []

    def put(self, ids: np.ndarray, state: dict[str, Any], rows: Rows) -> None:
        self._ids.append(ids)
        self._states.append(state if rows is None else self.executor.take_rows(self.stage, state, rows))
        self.rows += ids.size

    @property
    def head(self) -> int:
        return int(self._ids[0][0])

    def take_all(self) -> tuple[np.ndarray, dict[str, Any]]:
        ids = self._ids[0] if len(self._ids) == 1 else np.concatenate(self._ids)
        state = self.executor.join_rows(self.stage, self._states)
        self._ids, self._states, self.rows = [], [], 0
        return ids, state

    def release(self) -> None:
        pass


class RefillingScheduler:
    """Early exit over a stream of batches with a queue per stage (see the module docstring).

    `add(x, ok, n, payload)` admits one batch of `n` inputs of which the rows `ok` decoded into `x`
    (the others are the caller's error rows: answered at once, in their place); it returns what is
    answered and released by then. `finish()` runs what is left and returns the rest. `ordered`: release
    whole batches in admission order; otherwise release rows as they are answered.
    """

    def __init__(
        self,
        executor: Any,
        thresholds: np.ndarray,
        batch_size: int,
        ordered: bool = True,
        max_wait_rows: int | None = None,
        stage_calls: StageCalls | None = None,
    ) -> None:
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        self.batch_size = int(batch_size)
        wait = DEFAULT_WAIT_BATCHES * self.batch_size if max_wait_rows is None else int(max_wait_rows)
        if wait < self.batch_size:
            raise ConfigError(
                f"max_wait_rows={max_wait_rows} must be at least batch_size ({self.batch_size}), "
                "or stages could never fill a batch"
            )
        self.max_wait_rows = wait
        self.executor = executor
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        self.num_stages = executor.num_exits
        self.ordered = ordered
        self.calls = stage_calls if stage_calls is not None else StageCalls(self.num_stages)
        pool = executor.queue_buffers
        self._queues: list[_HostQueue | _DeviceQueue] = [
            _DeviceQueue(executor, k) if executor.io_binding else _HostQueue(self.batch_size, pool, k)
            for k in range(self.num_stages)
        ]
        self._admitted: deque[_Admitted] = deque()
        self._starts: np.ndarray | None = None  # first ids of _admitted, for id -> batch lookup
        self._fresh: list[tuple[_Admitted, np.ndarray]] = []  # unordered: answered since the last release
        self._next_id = 0
        self._released = 0

    # --- the caller's side -----------------------------------------------------------------------------
    def add(self, x: np.ndarray | None, ok: Sequence[int] | np.ndarray, n: int, payload: Any = None) -> list[Answered]:
        ok = np.asarray(ok, dtype=np.int64)
        if (x is None) != (ok.size == 0) or (x is not None and x.shape[0] != ok.size):
            raise ValueError(f"{ok.size} decoded positions for an input of {0 if x is None else x.shape[0]} rows")
        record = _Admitted(self._next_id, n, int(ok.size), payload)
        self._admitted.append(record)
        self._starts = None
        # setdiff1d costs about 55 µs a batch on the development VM; a batch that decoded whole needs none.
        failed = np.setdiff1d(np.arange(n), ok) if ok.size != n else ok[:0]
        if failed.size and not self.ordered:
            self._fresh.append((record, failed))
        self._next_id += n
        if x is not None:
            self._push(0, record.first_id + ok, self.executor.start(x))
        self._keep_waits_bounded()
        return self._release()

    def finish(self) -> list[Answered]:
        """Run every queue on what it holds, first stage first, and release everything left."""
        for k in range(self.num_stages):
            while self._queues[k].rows:
                self._run(k)
        for queue in self._queues:
            queue.release()
        out = self._release()
        if self._admitted:  # cannot happen unless a stage lost rows; never drop inputs silently
            raise RuntimeError(f"{sum(r.remaining for r in self._admitted)} input(s) were not answered")
        return out

    @property
    def queued_rows(self) -> list[int]:
        return [q.rows for q in self._queues]

    # --- stages ----------------------------------------------------------------------------------------
    def _push(self, k: int, ids: np.ndarray, state: dict[str, Any], rows: Rows = None) -> None:
        """Rows `rows` of `state` (ids `ids`) enter stage k's queue in pieces that fill it; a full queue runs
        before more enter."""
        queue, start, n = self._queues[k], 0, ids.size
        while start < n:
            take = min(self.batch_size - queue.rows, n - start)
            if start == 0 and take == n:
                queue.put(ids, state, rows)
            else:
                piece = slice(start, start + take) if rows is None else np.asarray(rows)[start : start + take]
                queue.put(ids[start : start + take], state, piece)
            self.calls.max_queued_rows[k] = max(self.calls.max_queued_rows[k], queue.rows)
            start += take
            if queue.rows >= self.batch_size:
                self._run(k)

    def _run(self, k: int) -> None:
        """Run stage k on all its queued rows; answer those that exit, queue the others for stage k+1."""
        ids, state = self._queues[k].take_all()
        t0 = time.perf_counter()
        logits, after = self.executor.run_stage(k, state)
        self.calls.add(k, ids.size, time.perf_counter() - t0)
        conf, pred = softmax_confidence(logits)
        if k == self.num_stages - 1:
            self._answer(ids, pred, conf, k)
            return
        leave = conf >= self.thresholds[k]
        if not leave.any():
            self._push(k + 1, ids, after)
            return
        self._answer(ids[leave], pred[leave], conf[leave], k)
        if not leave.all():
            keep = np.flatnonzero(~leave)
            self._push(k + 1, ids[keep], after, keep)

    def _keep_waits_bounded(self) -> None:
        """Run the stage that holds the oldest unanswered input until it is at most max_wait_rows behind."""
        while True:
            heads = [(q.head, k) for k, q in enumerate(self._queues) if q.rows]
            if not heads:
                return
            oldest, k = min(heads)
            if self._next_id - oldest <= self.max_wait_rows:
                return
            self._run(k)

    # --- answers ---------------------------------------------------------------------------------------
    def _answer(self, ids: np.ndarray, labels: np.ndarray, conf: np.ndarray, exit_index: int) -> None:
        if self._starts is None:
            self._starts = np.fromiter((r.first_id for r in self._admitted), dtype=np.int64)
        owner = np.searchsorted(self._starts, ids, side="right") - 1
        # ids are increasing within every queue, so each batch's rows form one run of `owner`.
        bounds = np.flatnonzero(np.diff(owner)) + 1
        for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [ids.size]])):
            record = self._admitted[int(owner[lo])]
            rows = ids[lo:hi] - record.first_id
            record.labels[rows] = labels[lo:hi]
            record.confidence[rows] = conf[lo:hi]
            record.exits[rows] = exit_index
            record.remaining -= int(hi - lo)
            if not self.ordered:
                self._fresh.append((record, rows))

    def _release(self) -> list[Answered]:
        out = []
        if self.ordered:
            while self._admitted and self._admitted[0].remaining == 0:
                r = self._admitted.popleft()
                self._starts = None
                out.append(Answered(r.payload, np.arange(r.labels.size), r.labels, r.confidence, r.exits))
                self._released += r.labels.size
            held = self._next_id - self._released
        else:
            for r, rows in self._fresh:
                out.append(Answered(r.payload, rows, r.labels[rows], r.confidence[rows], r.exits[rows]))
            self._fresh = []
            if any(r.remaining == 0 for r in self._admitted):
                self._admitted = deque(r for r in self._admitted if r.remaining > 0)
                self._starts = None
            held = sum(self.queued_rows)
        self.calls.max_held_rows = max(self.calls.max_held_rows, held)
        return out
