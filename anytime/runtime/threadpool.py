"""onnxruntime's intra-op thread pools for anytime's sessions: one per session, or one shared by the process.

A model's stages are one session each. With a pool per session the workers must block between calls, or the
pool of the stage that just ran spins against the next stage's for the same cores (measured: a 4-stage chain
at 16 threads ran at 0.2x the full graph's speed); blocking makes every parallel section wake its workers,
which on the small batches early exit leaves costs more than the work (measured, msdnet-tiny at 2 threads: a
stage on 16 rows 3.4x slower per row than on a spinning pool). onnxruntime's process-wide pool serves every
session with one set of spinning workers, so neither happens. It is made once per process, cannot be resized,
and from then on onnxruntime refuses sessions with their own pools, anytime's or anyone's; this module keeps
the one record of it, and every anytime session is configured here.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import numbers
import threading
from collections.abc import Iterator
from typing import Any

from anytime.errors import ConfigError, require
from anytime.formats.profile import THREAD_POOLS

log = logging.getLogger(__name__)

# The size of this process's shared onnxruntime intra-op pool once it is made (None: onnxruntime's default
# size); absent while there is none. onnxruntime makes it once per process, cannot resize it, and from then
# on refuses sessions with their own pools.
_shared_pool: dict[str, int | None] = {}
# Held while the pool is decided or made, and while an executor makes its sessions on what was decided
# (`deciding_pool`), so that no other thread makes the shared pool in between.
_shared_pool_lock = threading.RLock()


def shared_pool() -> tuple[bool, int | None]:
    """(whether this process has a shared pool, its thread count; None: onnxruntime's default)."""
    return "threads" in _shared_pool, _shared_pool.get("threads")


def _checked_threads(threads: int | None) -> int | None:
    """`threads` as onnxruntime takes it (None or 0: its default, returned as None); negative is refused."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 0:
        raise ConfigError(f"threads={threads!r} must be a whole number >= 0 (0 or None: onnxruntime's default)")
    return int(threads) or None


def resolve_thread_pool(thread_pool: str, threads: int | None) -> tuple[str, int | None]:
    """(pool kind, intra-op threads) an executor gets when it asks for `thread_pool` and `threads`.

    "shared": the process-wide pool, made here on first use. "session": a pool per stage session. Once the
    process has a shared pool, onnxruntime refuses per-session pools and the pool's size is fixed, so every
    later executor runs on it; a request for something else is logged as a warning (the answers are the
    same; only the speed differs) and the returned values say what the executor really got."""
    kind = str(thread_pool).lower()
    if kind not in THREAD_POOLS:
        raise ConfigError(f"thread_pool {thread_pool!r} is unknown; use one of {', '.join(THREAD_POOLS)}")
    wanted = _checked_threads(threads)
    with _shared_pool_lock:
        return _resolve_locked(kind, wanted)


@contextlib.contextmanager
def deciding_pool(thread_pool: str, threads: int | None) -> Iterator[tuple[str, int | None]]:
    """`resolve_thread_pool`'s answer, kept true while the caller makes its sessions in the `with` block.

    Between the two, another thread's executor could make the shared pool: the sessions made after would run
    on it (`configure_threads` must put them there) while the executor said "session" with its own count."""
    with _shared_pool_lock:
        yield resolve_thread_pool(thread_pool, threads)


def _resolve_locked(kind: str, wanted: int | None) -> tuple[str, int | None]:
    if "threads" in _shared_pool:
        have = _shared_pool["threads"]
        # One thread has no pool workers to share: a session pool of 1 and the shared pool of 1 are alike.
        if have != wanted or (kind != "shared" and wanted != 1):

            def show(n: int | None) -> str:
                return "onnxruntime's default number of" if n is None else str(n)

            log.warning(
                "this process already has a shared onnxruntime thread pool of %s threads, which onnxruntime cannot "
                "resize or mix with per-session pools: this model runs on it (asked for: a %s pool of %s threads)",
                show(have),
                kind,
                show(wanted),
            )
        return "shared", have
    if kind == "session":
        return "session", wanted
    ort = require("onnxruntime", "cpu", "Running a bundle")
    set_sizes = getattr(importlib.import_module("onnxruntime.capi._pybind_state"), "set_global_thread_pool_sizes", None)
    if set_sizes is None:
        raise ConfigError(
            f"onnxruntime {ort.__version__} has no shared thread pool; use thread_pool='session' (--thread-pool session)"
        )
    try:
        set_sizes(wanted or 0, 1)
    except Exception as exc:  # made outside anytime (onnxruntime raises its own non-exported types)
        raise ConfigError(
            f"onnxruntime's shared thread pool was already made outside anytime ({exc}); its size is unknown here: "
            "use thread_pool='session' (--thread-pool session) in a process that has no shared pool"
        ) from exc
    _shared_pool["threads"] = wanted
    return "shared", wanted


def configure_threads(options: Any, threads: int | None, spinning: bool = False, shared_pool: bool = False) -> None:
    """Set a session's thread options: the process's shared pool when `shared_pool` or when the process has
    one (onnxruntime refuses any other then; `threads` and `spinning` do not apply), else a pool of `threads`
    (None: onnxruntime's default) whose workers spin only with `spinning`."""
    if shared_pool or "threads" in _shared_pool:
        options.use_per_session_threads = False
        return
    if threads is not None:
        options.intra_op_num_threads = _checked_threads(threads) or 0
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
