"""Measuring a latency profile (`anytime profile`, `model.profile()`), and checking that a profile fits the
model it is used with.

A profile prices what the early-exit executor really does for one stage call, not the graph alone: gathering
the rows that go on into a compacted batch (from the second stage on), the session run, and the exit test
(softmax confidence, the threshold mask, the answers' bookkeeping); the batch's set-up counts to the first
stage. The times come from the executor's own trace of `run_early_exit`: a full batch through the first
stage, then r of its rows through every later stage, for each row count r. On a small model that host work is a tenth of the time or more
(measured: 7-16% on msdnet-tiny at batch 64), and a profile of the session runs alone made every time
budget overshoot by that much. Each row count of `profile_rows(batch_size)` is timed so, warm, on the model's own sessions: early exit
compacts a batch, so later stages run on fewer rows, and a small call costs more per row. The inputs are random (a stage's time does not depend on the pixel values). Repeats go round all row
counts in turn, so a slow spell of a shared machine spreads over all of them, and the median is kept.

The refilling scheduler does more host work than those steps (queues, the answers' bookkeeping, admitting and
releasing batches). So the profile also runs the scheduler over a short stream of the same random batch, every
stage on full batches (reach falling from all rows at the first stage to half at the last), and keeps its time
beyond the steps' price, per row and stage call (`refill_overhead_seconds`): that work is per call and per row,
not per multiply-add, so it is priced per stage a row runs, not as a share of the stages' time (measured on
msdnet-tiny at batch 64, one thread, before the first stage's chain time was fixed: the scheduler's excess over
its price was 2.6, 2.75 and 1.9 µs per row and stage at 25%, 50% and 75% budgets, but 20, 5.7 and 3.0 per row
of the later stages alone).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anytime import __version__
from anytime.errors import ConfigError, ProfileError, ProfileMismatchWarning
from anytime.formats.bundle import Bundle, bundle_identity
from anytime.formats.profile import MAKE_ONE, SESSION_TIMING, STEP_TIMING, LatencyProfile, profile_rows

if TYPE_CHECKING:
    from anytime.runtime.engine import StageExecutor

log = logging.getLogger(__name__)


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }


def measure_profile(
    bundle: Bundle, executor: StageExecutor, batch_size: int = 64, repeats: int = 15, warmup: int = 2, seed: int = 0
) -> LatencyProfile:
    """Time every stage step of `bundle` on `executor` at the row counts of `profile_rows(batch_size)`."""
    from anytime.runtime.engine import import_onnxruntime

    ort = import_onnxruntime()

    if int(repeats) < 1 or int(warmup) < 0:
        raise ConfigError(f"repeats={repeats} must be at least 1 and warmup={warmup} at least 0")
    rows = profile_rows(int(batch_size))
    spec = bundle.input
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows[-1], spec.channels, spec.height, spec.width)).astype(np.float32)
    times = np.empty((bundle.num_exits, len(rows), int(repeats)))
    alone = np.empty((len(rows), int(repeats)))
    after = np.empty((len(rows), int(repeats)))
    held_before = executor.queue_buffers.held_bytes
    stream = _RefillStream(executor, x)
    # The stream is as long as the whole chain of about six batches: timed every few repeats, about five times.
    stream_every = max(1, int(repeats) // REFILL_STREAMS)
    for rep in range(-int(warmup), int(repeats)):
        for i, r in enumerate(rows):
            later, first, first_after = _time_stage_steps(executor, x, r)
            first_alone = _time_first_stage_alone(executor, x, r)
            if rep >= 0:
                times[1:, i, rep] = later
                times[0, i, rep] = first
                alone[i, rep] = first_alone
                after[i, rep] = first_after
        if rep < 0 or rep % stream_every == 0:
            stream.run(timed=rep >= 0)
    medians = np.median(times, axis=2)
    log.debug("profile medians (s per stage step): %s", medians)
    profile = LatencyProfile(
        rows=rows,
        stage_call_seconds=[[float(max(t, 1e-9)) for t in stage] for stage in medians],
        bundle_arch=bundle.arch,
        bundle_identity=bundle_identity(bundle),
        provider=str(executor.providers[0]),
        providers=[str(p) for p in executor.providers],
        threads=executor.threads,
        thread_pool=executor.thread_pool,
        repeats=int(repeats),
        onnxruntime_version=str(ort.__version__),
        anytime_version=__version__,
        machine=machine_info(),
        created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        timing=STEP_TIMING,
        first_stage_alone_seconds=[float(max(t, 1e-9)) for t in np.median(alone, axis=1)],
        first_stage_after_seconds=[float(max(t, 1e-9)) for t in np.median(after, axis=1)],
    )
    profile.refill_overhead_seconds = stream.overhead(profile)
    if not held_before:  # the stream's queue buffers (a batch of every stage's state) are not the caller's to keep
        executor.queue_buffers.clear()
    return profile


REFILL_STREAMS = 5  # timed runs of the refilling stream per profile
REFILL_STREAM_BATCHES = 6


class _RefillStream:
    """The refilling scheduler over `REFILL_STREAM_BATCHES` copies of one batch, thresholds set so that the
    rows reaching stage k fall linearly from the whole batch at the first stage to half of it at the last:
    every stage gets full calls, and most rows reach a stage partly, so rows are copied into queues as in
    serving. Each run's wall time over its `add` calls and the rows each stage ran in them are kept (the calls
    `finish` makes on part-filled queues at the end of a stream are left out of both)."""

    def __init__(self, executor: StageExecutor, x: np.ndarray) -> None:
        from anytime.runtime.calibration import softmax_confidence

        self.executor, self.x = executor, x
        k_exits, batch = executor.num_exits, x.shape[0]
        confidence, _ = softmax_confidence(executor.run_all(x))  # (K, B)
        target = [batch - (batch * k) // (2 * (k_exits - 1)) if k_exits > 1 else batch for k in range(k_exits)]
        going = np.arange(batch)
        thresholds = np.full(k_exits, np.inf, dtype=np.float32)
        for k in range(k_exits - 1):
            if target[k + 1] < going.size:
                # the target[k+1] least confident rows go on; the others leave, at or above the threshold
                order = going[np.argsort(confidence[k, going], kind="stable")]
                thresholds[k] = np.nextafter(confidence[k, order[target[k + 1] - 1]], np.float32(np.inf))
                going = going[confidence[k, going] < thresholds[k]]
        self.thresholds = thresholds
        self.seconds: list[float] = []
        self.rows: list[np.ndarray] = []

    def run(self, timed: bool) -> None:
        from anytime.runtime.scheduler import RefillingScheduler, StageCalls

        batch = self.x.shape[0]
        calls = StageCalls(self.executor.num_exits)
        scheduler = RefillingScheduler(self.executor, self.thresholds, batch, stage_calls=calls)
        everything = np.arange(batch)
        t0 = time.perf_counter()
        for _ in range(REFILL_STREAM_BATCHES):
            scheduler.add(self.x, everything, batch)
        seconds = time.perf_counter() - t0
        rows = np.array(calls.rows_per_stage, dtype=np.float64)
        scheduler.finish()
        if timed:
            self.seconds.append(seconds)
            self.rows.append(rows)

    def overhead(self, profile: LatencyProfile) -> float:
        """Median over the timed runs of (wall time − the steps' full-batches price of the rows each stage
        ran) per row and stage call (0.0 when nothing ran)."""
        from anytime.runtime.costmodel import TimeCost

        price = TimeCost(dataclasses.replace(profile, refill_overhead_seconds=None), "full-batches")
        images = REFILL_STREAM_BATCHES * self.x.shape[0]
        extra = [
            (seconds - float(price.reach_cost(rows, images)) * images) / rows.sum()
            for seconds, rows in zip(self.seconds, self.rows)
            if rows.sum() > 0
        ]
        return float(np.median(extra)) if extra else 0.0


def _time_stage_steps(executor: StageExecutor, x: np.ndarray, rows: int) -> tuple[list[float], float, float]:
    """(seconds of stages 2..K on `rows` rows after the first stage ran on all of `x`; seconds of the first
    stage on `rows` rows right after a chain whose later stages ran `rows` rows; seconds of the first stage on
    all of `x` right after that chain), each stage's time being its step in the executor's own trace (session
    run, exit test, bookkeeping) plus the gather of the rows that enter it.

    A later stage is timed where serving calls it: after the first stage has run on a full batch, which
    leaves the caches cold for the small call (measured: a stage on a few rows costs up to a fifth more
    then than after a chain of equally small calls). So is the first stage: right after later calls, which
    evict its data. The first call here follows `_time_first_stage_alone`'s back-to-back calls, warm from
    them; timed there, the first stage's chain time was its back-to-back time (measured on msdnet-tiny,
    batch 64: 40.5 µs a row after a full chain, 34.6 after back-to-back calls at one thread; 26.0 and 24.3 at
    two) and stage 1 was priced up to 15% low where most rows go on. Its time on the full batch after later
    calls on `rows` rows gives `first_stage_after_seconds`."""
    never = np.full(executor.num_exits, np.inf, dtype=np.float32)
    *_, trace = executor.run_early_exit(x, never, profile_rows=rows)
    later = [step + gather for step, gather in zip(trace.step_seconds[1:], trace.gather_seconds[1:])]
    *_, after = executor.run_early_exit(x, never, profile_rows=rows)
    if rows == x.shape[0]:
        return later, after.step_seconds[0], after.step_seconds[0]
    *_, small = executor.run_early_exit(x[:rows], never, profile_rows=rows)
    return later, small.step_seconds[0], after.step_seconds[0]


def _time_first_stage_alone(executor: StageExecutor, x: np.ndarray, rows: int) -> float:
    """Seconds of the first stage's step on `rows` rows among back-to-back first-stage calls (every row
    leaving at the first exit), as serving runs it at budgets where few rows go on.

    The first calls after a full chain are as slow as the chain's or slower, and about three calls warm it
    up (measured on msdnet-tiny), so the median of three calls is taken after three untimed ones."""
    first_only = np.full(executor.num_exits, -np.inf, dtype=np.float32)
    seconds = []
    for call in range(6):
        *_, trace = executor.run_early_exit(x[:rows], first_only)
        if call >= 3:
            seconds.append(trace.step_seconds[0])
    return float(np.median(seconds))


def check_profile(profile: LatencyProfile, bundle: Bundle, executor: StageExecutor, where: str = "") -> None:
    """Refuse a profile of another bundle or provider (its times say nothing about this model); warn when
    it was measured with another thread count, CPU or onnxruntime (the times are off, by how much unknown)."""
    from anytime.runtime.engine import import_onnxruntime

    ort = import_onnxruntime()

    name = f"latency profile {where}" if where else "the latency profile"
    identity = bundle_identity(bundle)
    if profile.num_exits != bundle.num_exits or profile.bundle_identity != identity:
        raise ProfileError(
            f"{name} was measured for another bundle ({profile.bundle_arch}, {profile.num_exits} stages, identity "
            f"{profile.bundle_identity[:12]}) than {bundle.path} ({bundle.arch}, {bundle.num_exits} stages, identity "
            f"{identity[:12]}); profile this bundle: anytime profile {bundle.path} -o FILE"
        )
    provider = str(executor.providers[0])
    if profile.provider != provider:
        raise ProfileError(
            f"{name} was measured on {profile.provider}, but this model runs on {provider}; times do not carry "
            f"over between providers: {MAKE_ONE} with the same --device/--providers"
        )
    threads = executor.threads
    problems = []
    if profile.threads != threads:

        def show(n: int | None) -> str:
            return "onnxruntime's default" if n is None else str(n)

        problems.append(f"threads {show(profile.threads)} when measured, {show(threads)} now")
    if profile.thread_pool != executor.thread_pool and threads != 1:  # one thread: no pool workers at all
        problems.append(
            f"a {profile.thread_pool} intra-op thread pool when measured, a {executor.thread_pool} one now "
            "(a shared pool runs small compacted batches much faster at 2 threads and more)"
        )
    cpu = cpu_name()
    if profile.machine.get("cpu") not in (None, cpu):
        problems.append(f"CPU {profile.machine.get('cpu')!r} when measured, {cpu!r} now")
    if profile.onnxruntime_version and profile.onnxruntime_version != ort.__version__:
        problems.append(f"onnxruntime {profile.onnxruntime_version} when measured, {ort.__version__} now")
    if profile.timing == SESSION_TIMING:
        problems.append(
            "it is an older profile that times the stage graphs alone, without the executor's host work between "
            "them (a tenth of the time or more on small models)"
        )
    if problems:
        warnings.warn(
            f"{name} was measured under other conditions ({'; '.join(problems)}): time budgets will be off; "
            "re-profile with the options you serve with",
            ProfileMismatchWarning,
            stacklevel=3,
        )
