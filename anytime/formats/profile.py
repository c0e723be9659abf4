"""The latency profile `anytime profile` writes: each stage's measured seconds per call at several row counts,
on one machine, provider and thread count, for one bundle.

    {"format": "anytime-latency-profile", "format_version": 1,
     "bundle": {"arch": "msdnet-tiny", "identity": "<sha256>", "num_exits": 4},
     "provider": "CPUExecutionProvider", "providers": ["CPUExecutionProvider"], "threads": 1,
     "thread_pool": "shared",
     "batch_size": 64, "repeats": 15, "onnxruntime_version": "1.32.0", "anytime_version": "0.1.0",
     "machine": {"cpu": "...", "cpu_count": 2, "platform": "Linux-...", "hostname": "..."},
     "created": "2026-12-02T15:00:00Z", "timing": "step",
     "rows": [1, 2, 4, 8, 16, 32, 64],
     "stage_call_seconds": [[...7 medians...], ...one list per stage...],
     "first_stage_alone_seconds": [...7 medians...],
     "first_stage_after_seconds": [...7 medians...],
     "refill_overhead_seconds": 1.9e-06,
     "stage_seconds_per_row": [...]}          # at batch_size: stage_call_seconds[k][-1] / batch_size

`rows` are the batch sizes one stage call was timed at (early exit compacts a batch, so later stages run
on fewer rows); between them the time of a call is interpolated linearly, below the first through zero
(a stage no row reaches is not called), above the last at the last time per row. The table times the first
stage after a whole chain of later calls (every row going on); `first_stage_alone_seconds` times it in
calls that follow each other with no later stage between them (every row leaving at the first exit), which
is faster because the caches still hold the first stage's data (measured on msdnet-tiny: 0.85 of the chain
time at 2 threads). A batch's first-stage call is priced between the two by how much of the later stages'
work runs (`first_stage_seconds`); profiles without the key price it at the chain time.
`first_stage_after_seconds[i]` times the first stage on the whole batch right after the later stages ran on
rows[i] rows: a little later work already evicts most of what back-to-back calls keep warm (measured on
msdnet-tiny at one thread: with 7% of the later work running, the first stage took 27% of the way from its
back-to-back to its chain time; with 39%, 75%), so the per-batch price follows this measured curve instead
of a straight line; full batches, where the later stages run in whole calls between runs of first-stage
calls, keep the straight line. Profiles without the key use the straight line for both. `timing` says what one
call's time covers: "step", the executor's whole stage step (gathering the rows that go on, the session run,
the exit test); "session", the session run alone (profiles written before `timing` existed, which lack the
key, were timed so; they still load, with a warning when used). `thread_pool` is how the stage sessions
shared intra-op threads: "shared", one process-wide pool; "session", one pool per stage session (profiles
without the key were measured so). `refill_overhead_seconds` is what the refilling stage scheduler spends per
row and stage call beyond the timed steps (its queues, the answers' bookkeeping, admitting and releasing
batches), measured on a stream; a policy priced for full batches (`TimeCost(mode="full-batches")`) adds it for
every stage a row runs (profiles without the key add nothing). `bundle.identity` is
`anytime.formats.bundle.bundle_identity`. Torch-free (json, numpy); this module is the format's one definition.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from anytime.errors import ProfileError
from anytime.fileio import atomic_write_json

FORMAT = "anytime-latency-profile"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MAKE_ONE = "make one with `anytime profile BUNDLE -o profile.json` (Python: model.profile().save(path))"

STEP_TIMING = "step"
SESSION_TIMING = "session"
TIMINGS = (STEP_TIMING, SESSION_TIMING)
THREAD_POOLS = ("shared", "session")  # the executor's intra-op pools (anytime.runtime.threadpool.resolve_thread_pool)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def profile_rows(batch_size: int) -> list[int]:
    """The row counts a profile times each stage at: powers of two below `batch_size`, and `batch_size`."""
    if int(batch_size) < 1:
        raise ProfileError(f"batch_size={batch_size} must be at least 1")
    rows, r = [], 1
    while r < batch_size:
        rows.append(r)
        r *= 2
    return rows + [int(batch_size)]


@dataclass
class LatencyProfile:
    """Measured stage times of one bundle on one machine, provider and thread count."""

    rows: list[int]
    stage_call_seconds: list[list[float]]  # [stage][i]: median seconds of one call on rows[i] rows
    bundle_arch: str
    bundle_identity: str
    provider: str
    providers: list[str] = field(default_factory=list)
    threads: int | None = None  # intra-op threads asked for; None: onnxruntime's default
    # "shared": one intra-op pool for every stage session (spinning); "session": a blocking pool per stage
    # session, which profiles written before the shared pool existed all used.
    thread_pool: str = "session"
    repeats: int = 0
    onnxruntime_version: str = ""
    anytime_version: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    timing: str = STEP_TIMING  # what one call's time covers (see the module docstring)
    # [i]: median seconds of a first-stage call on rows[i] rows right after another first-stage call
    first_stage_alone_seconds: list[float] | None = None
    # [i]: median seconds of a first-stage call on the whole batch right after the later stages ran rows[i] rows
    first_stage_after_seconds: list[float] | None = None
    # seconds per row and stage call the refilling scheduler spends beyond the timed steps
    refill_overhead_seconds: float | None = None

    def __post_init__(self) -> None:
        problems = _table_problems(self.rows, self.stage_call_seconds)
        problems += _per_row_count_problems(self.rows, self.first_stage_alone_seconds, "first_stage_alone_seconds")
        problems += _per_row_count_problems(self.rows, self.first_stage_after_seconds, "first_stage_after_seconds")
        problems += _overhead_problems(self.refill_overhead_seconds)
        if self.thread_pool not in THREAD_POOLS:
            problems.append(f"thread_pool is {self.thread_pool!r}, expected one of {', '.join(THREAD_POOLS)}")
        if self.timing not in TIMINGS:
            problems.append(f"timing is {self.timing!r}, expected one of {', '.join(TIMINGS)}")
        if problems:
            raise ProfileError("latency profile: " + "; ".join(problems))

    # --- what the numbers say ------------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        return len(self.stage_call_seconds)

    @property
    def batch_size(self) -> int:
        return int(self.rows[-1])

    @property
    def refill_overhead_priced(self) -> float:
        """The refilling scheduler's own work per row and stage call as pricing counts it: the measured
        difference, or 0 where timing noise on a busy machine made it negative (work cannot save time)."""
        return max(0.0, self.refill_overhead_seconds or 0.0)

    def call_seconds(self, stage: int, rows: Any) -> np.ndarray:
        """Seconds of one call of `stage` (0-based) on `rows` rows (a number or an array; fractional rows
        interpolate, which is what an expected row count needs); 0 rows cost nothing."""
        return _interpolate(self.rows, self.stage_call_seconds[stage], rows)

    def first_stage_seconds(self, rows: Any, later: Any, every_row_on: Any, measured_curve: bool = True) -> np.ndarray:
        """Seconds of one first-stage call on `rows` rows when the later stages run `later` seconds of work
        before the next first-stage call, out of `every_row_on` had every row gone on: at the whole chain (the
        table's timing) its chain time, with none of it (`first_stage_alone_seconds`) its back-to-back time,
        between them along the measured curve (`first_stage_after_seconds`, with `measured_curve`) or a
        straight line."""
        chain = self.call_seconds(0, rows)
        if self.first_stage_alone_seconds is None:
            return chain
        # Never above the chain time: a slower back-to-back median is noise, and a higher price for less
        # work would make cost fall as more rows go on, and the cheapest policy dearer than the first exit.
        alone = np.minimum(_interpolate(self.rows, self.first_stage_alone_seconds, rows), chain)
        later, every_row_on = np.broadcast_arrays(np.asarray(later, np.float64), np.asarray(every_row_on, np.float64))
        share = np.clip(np.divide(later, every_row_on, out=np.zeros(later.shape), where=every_row_on > 0), 0.0, 1.0)
        if measured_curve and self.first_stage_after_seconds is not None:
            shares, fractions = self.first_stage_curve
            share = np.interp(share, shares, fractions)
        return alone + (chain - alone) * share

    @functools.cached_property
    def first_stage_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(share of the later stages' work that ran, fraction of the way from the first stage's back-to-back
        time to its chain time it then took): from (0, 0) through the measured points to (1, 1), kept rising
        (more later work cannot warm the caches) and within [0, 1]. Computed once: calibration prices
        thousands of candidate policies with it (it was a third of a per-batch calibration's time); a profile's
        tables are not changed after it is made (`dataclasses.replace` makes a new one)."""
        assert self.first_stage_after_seconds is not None and self.first_stage_alone_seconds is not None
        b = self.batch_size
        chain = float(self.stage_call_seconds[0][-1])
        alone = min(float(self.first_stage_alone_seconds[-1]), chain)
        every_row_on = sum(float(self.call_seconds(k, b)) for k in range(1, self.num_exits))
        if every_row_on <= 0 or chain - alone <= 0:
            return np.array([0.0, 1.0]), np.array([0.0, 1.0])
        shares = [
            sum(float(self.call_seconds(k, r)) for k in range(1, self.num_exits)) / every_row_on for r in self.rows
        ]
        fractions = np.clip((np.asarray(self.first_stage_after_seconds) - alone) / (chain - alone), 0.0, 1.0)
        xs = np.concatenate([[0.0], np.minimum(shares[:-1], 1.0), [1.0]])
        ys = np.concatenate([[0.0], fractions[:-1], [1.0]])
        order = np.argsort(xs, kind="stable")
        return xs[order], np.maximum.accumulate(ys[order])

    def batch_seconds(self, rows_per_stage: Sequence[Any]) -> np.ndarray:
        """Seconds of one batch whose stage k runs on `rows_per_stage[k]` rows (numbers, or arrays of one
        shape: expected row counts interpolate), the first stage priced by the share of the later stages'
        work that runs (`first_stage_seconds`): the later calls' time over their time had every row gone on."""
        first_rows = np.asarray(rows_per_stage[0], dtype=np.float64)
        later = sum((self.call_seconds(k, rows_per_stage[k]) for k in range(1, len(rows_per_stage))), np.zeros(()))
        if self.first_stage_alone_seconds is None or len(rows_per_stage) < 2:
            return self.call_seconds(0, first_rows) + later
        every_row_on = sum(self.call_seconds(k, first_rows) for k in range(1, len(rows_per_stage)))
        return self.first_stage_seconds(first_rows, later, every_row_on) + later

    @property
    def seconds_per_row(self) -> np.ndarray:
        """Each stage's seconds per row at the profile's batch size, (K,)."""
        return np.array([s[-1] for s in self.stage_call_seconds], dtype=np.float64) / self.batch_size

    @property
    def exit_seconds(self) -> np.ndarray:
        """Cumulative seconds per image of exits 1..K when every stage runs full batches, (K,)."""
        return np.cumsum(self.seconds_per_row)

    @property
    def full_seconds(self) -> float:
        """Seconds per image of the full network (every stage, full batches)."""
        return float(self.exit_seconds[-1])

    # --- file ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "bundle": {"arch": self.bundle_arch, "identity": self.bundle_identity, "num_exits": self.num_exits},
            "provider": self.provider,
            "providers": list(self.providers),
            "threads": self.threads,
            "thread_pool": self.thread_pool,
            "batch_size": self.batch_size,
            "repeats": self.repeats,
            "onnxruntime_version": self.onnxruntime_version,
            "anytime_version": self.anytime_version,
            "machine": dict(self.machine),
            "created": self.created,
            "timing": self.timing,
            "rows": [int(r) for r in self.rows],
            "stage_call_seconds": [[float(t) for t in s] for s in self.stage_call_seconds],
            "stage_seconds_per_row": [float(t) for t in self.seconds_per_row],
            **(
                {"first_stage_alone_seconds": [float(t) for t in self.first_stage_alone_seconds]}
                if self.first_stage_alone_seconds is not None
                else {}
            ),
            **(
                {"first_stage_after_seconds": [float(t) for t in self.first_stage_after_seconds]}
                if self.first_stage_after_seconds is not None
                else {}
            ),
            **(
                {"refill_overhead_seconds": float(self.refill_overhead_seconds)}
                if self.refill_overhead_seconds is not None
                else {}
            ),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "latency profile") -> "LatencyProfile":
        problems = profile_problems(d)
        if problems:
            raise ProfileError(f"{where}: " + "; ".join(problems) + f"; {MAKE_ONE}")
        bundle = d["bundle"]
        return cls(
            rows=[int(r) for r in d["rows"]],
            stage_call_seconds=[[float(t) for t in s] for s in d["stage_call_seconds"]],
            bundle_arch=str(bundle.get("arch", "?")),
            bundle_identity=str(bundle["identity"]),
            provider=str(d["provider"]),
            providers=[str(p) for p in d.get("providers", [d["provider"]])],
            threads=None if d.get("threads") is None else int(d["threads"]),
            thread_pool=str(d.get("thread_pool", "session")),
            repeats=int(d.get("repeats", 0)),
            onnxruntime_version=str(d.get("onnxruntime_version", "")),
            anytime_version=str(d.get("anytime_version", "")),
            machine=dict(d.get("machine") or {}),
            created=str(d.get("created", "")),
            timing=str(d.get("timing", SESSION_TIMING)),
            first_stage_alone_seconds=(
                None
                if d.get("first_stage_alone_seconds") is None
                else [float(t) for t in d["first_stage_alone_seconds"]]
            ),
            first_stage_after_seconds=(
                None
                if d.get("first_stage_after_seconds") is None
                else [float(t) for t in d["first_stage_after_seconds"]]
            ),
            refill_overhead_seconds=(
                None if d.get("refill_overhead_seconds") is None else float(d["refill_overhead_seconds"])
            ),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile as JSON, atomically (the file holds the old profile or all of the new one)."""
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyProfile":
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"latency profile '{path}' does not exist; {MAKE_ONE}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"cannot read latency profile '{path}' ({exc}); {MAKE_ONE}") from exc
        return cls.from_dict(d, where=str(path))

    def describe(self) -> str:
        threads = "onnxruntime's default" if self.threads is None else str(self.threads)
        per_row = ", ".join(f"{1e6 * t:.3g}" for t in self.seconds_per_row)
        return (
            f"latency profile of {self.bundle_arch} ({self.bundle_identity[:12]}) on {self.provider}, "
            f"threads {threads} ({self.thread_pool} pool), batch {self.batch_size}: full network {1e6 * self.full_seconds:.4g} µs per image; "
            f"per stage µs per row [{per_row}]"
            + (
                f"; refilling scheduler {1e6 * self.refill_overhead_seconds:+.3g} µs per row and stage"
                if self.refill_overhead_seconds is not None
                else ""
            )
        )


def _interpolate(rows: list[int], seconds: list[float], at: Any) -> np.ndarray:
    """A call's seconds on `at` rows from the times of calls on `rows` rows: linear between, through zero
    below the first, and beyond the last at the last time per row."""
    r = np.asarray(at, dtype=np.float64)
    xs = np.concatenate([[0.0], np.asarray(rows, dtype=np.float64)])
    ys = np.concatenate([[0.0], np.asarray(seconds, dtype=np.float64)])
    inside = np.interp(np.minimum(r, xs[-1]), xs, ys)
    return np.where(r > xs[-1], r * (ys[-1] / xs[-1]), inside)


def _per_row_count_problems(rows: Any, seconds: Any, key: str) -> list[str]:
    """What is wrong with an optional list `key` of seconds, one per row count."""
    if seconds is None or not isinstance(rows, list):
        return []
    if not isinstance(seconds, list) or len(seconds) != len(rows):
        return [f"{key} must hold {len(rows)} numbers, one per row count"]
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0 for t in seconds):
        return [f"{key} = {seconds} must be positive finite seconds"]
    return []


def _overhead_problems(overhead: Any) -> list[str]:
    if overhead is None:
        return []
    if isinstance(overhead, bool) or not isinstance(overhead, (int, float)) or not math.isfinite(overhead):
        return [f"refill_overhead_seconds is {overhead!r}, expected a finite number of seconds"]
    return []


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _table_problems(rows: Any, table: Any) -> list[str]:
    problems: list[str] = []
    if not (isinstance(rows, list) and rows and all(_is_int(r) and r > 0 for r in rows)):
        return [f"rows is {rows!r}, expected a non-empty list of positive integers"]
    if any(b <= a for a, b in zip(rows, rows[1:])):
        problems.append(f"rows {rows} must be strictly increasing")
    if not (isinstance(table, list) and table):
        return problems + ["stage_call_seconds: missing or empty list"]
    for k, times in enumerate(table):
        if not isinstance(times, list) or len(times) != len(rows):
            problems.append(f"stage_call_seconds[{k}] must hold {len(rows)} numbers, one per row count")
        elif not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0 for t in times
        ):
            problems.append(f"stage_call_seconds[{k}] = {times} must be positive finite seconds")
    return problems


def profile_problems(d: Any) -> list[str]:
    """Everything wrong with a profile's JSON structure; empty when it is valid."""
    if not isinstance(d, dict):
        return [f"a latency profile is a JSON object, got a JSON {type(d).__name__}"]
    if d.get("format") != FORMAT:
        return [f"format is {d.get('format')!r}, expected {FORMAT!r}: this is not an anytime latency profile"]
    version = d.get("format_version")
    if not _is_int(version) or version not in SUPPORTED_FORMAT_VERSIONS:
        newer = _is_int(version) and version > max(SUPPORTED_FORMAT_VERSIONS)
        return [
            f"format_version is {version!r} (this anytime reads {list(SUPPORTED_FORMAT_VERSIONS)})"
            + ("; upgrade anytime to read it" if newer else "")
        ]
    problems = _table_problems(d.get("rows"), d.get("stage_call_seconds"))
    for key in ("first_stage_alone_seconds", "first_stage_after_seconds"):
        problems += _per_row_count_problems(d.get("rows"), d.get(key), key)
    problems += _overhead_problems(d.get("refill_overhead_seconds"))
    bundle = d.get("bundle")
    if not isinstance(bundle, dict) or not isinstance(bundle.get("identity"), str):
        problems.append("bundle.identity is missing")
    elif not _SHA256.match(bundle["identity"]):
        problems.append(f"bundle.identity {bundle['identity']!r} is not 64 lowercase hex digits")
    elif isinstance(d.get("stage_call_seconds"), list) and bundle.get("num_exits") != len(d["stage_call_seconds"]):
        problems.append(
            f"bundle.num_exits {bundle.get('num_exits')!r} differs from the {len(d['stage_call_seconds'])} stages timed"
        )
    if not isinstance(d.get("provider"), str) or not d["provider"]:
        problems.append("provider is missing")
    if "thread_pool" in d and d["thread_pool"] not in THREAD_POOLS:
        problems.append(f"thread_pool is {d['thread_pool']!r}, expected one of {', '.join(THREAD_POOLS)}")
    if "timing" in d and d["timing"] not in TIMINGS:
        problems.append(f"timing is {d['timing']!r}, expected one of {', '.join(TIMINGS)}")
    if d.get("machine") is not None and not isinstance(d["machine"], dict):
        problems.append(f"machine is {d['machine']!r}, expected an object")
    providers, repeats = d.get("providers"), d.get("repeats")
    if providers is not None and not (isinstance(providers, list) and all(isinstance(p, str) for p in providers)):
        problems.append(f"providers is {providers!r}, expected a list of provider names")
    if repeats is not None and not (_is_int(repeats) and repeats >= 0):
        problems.append(f"repeats is {repeats!r}, expected an integer >= 0")
    threads = d.get("threads")
    if threads is not None and not (_is_int(threads) and threads >= 0):
        problems.append(f"threads is {threads!r}, expected null or an integer >= 0")
    if d.get("batch_size") != (d["rows"][-1] if isinstance(d.get("rows"), list) and d["rows"] else None):
        problems.append(f"batch_size {d.get('batch_size')!r} is not the largest row count timed")
    return problems
