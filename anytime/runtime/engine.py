"""ONNX Runtime sessions for a bundle's stages, and the batched early-exit executor.

A batch runs stage by stage. After each stage the samples whose confidence reaches that exit's threshold
leave; the rest are compacted (one row take per state tensor) into a smaller batch that goes on with its
state tensors. Nothing is computed twice and no sample runs a stage it does not need.

The executor's stage steps (`start`, `run_stage`, `take_rows`, `join_rows`) work on a *state*: a dict of
the tensors one stage hands to the next. On the plain path they are numpy arrays; with IO binding
(`anytime.runtime.iobinding`) they are `OrtValue`s that stay on the device, and only logits come to the
host. `run_early_exit` (one batch, compacted per stage) and `anytime.runtime.scheduler.RefillingScheduler`
(a stream, stages refilled to full batches) are both built from these steps.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anytime.errors import BundleError, ConfigError, MissingDependencyError, require
from anytime.formats.bundle import Bundle, StageSpec
from anytime.runtime.buffers import BufferPool, Buffers, copy_rows
from anytime.runtime.calibration import softmax_confidence
from anytime.runtime.iobinding import CPU, CUDA, DeviceRows, bind_input, resolve_io_binding
from anytime.runtime.threadpool import configure_threads, deciding_pool

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def import_onnxruntime(gpu: bool = False) -> Any:
    return require("onnxruntime", "gpu" if gpu else "cpu", "Running a bundle")


_cuda_libraries = {"tried": False}
_cuda_libraries_lock = threading.Lock()


def preload_cuda_libraries(ort: Any) -> None:
    """Load CUDA and cuDNN from the nvidia-* pip packages (where torch's CUDA build and their own wheels put
    them) before the first CUDA session, once per process.

    onnxruntime-gpu's CUDA provider otherwise finds them only on the library path, and when it does not, the
    session silently runs on the CPU. `onnxruntime.preload_dlls` (1.21 and later) prints its complaints to
    stdout, which may be carrying predictions: they go to the log instead."""
    preload = getattr(ort, "preload_dlls", None)
    with _cuda_libraries_lock:
        if preload is None or _cuda_libraries["tried"]:
            return
        _cuda_libraries["tried"] = True
        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said):
                preload()
        except Exception as exc:  # a missing or broken library: the provider check below reports the outcome
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
        if said.getvalue().strip():
            log.info("onnxruntime.preload_dlls: %s", said.getvalue().strip())


def resolve_providers(providers: Sequence[Any] | str | None, device: str | None = None) -> list[Any]:
    """Explicit provider list: CUDA when onnxruntime-gpu and a GPU are present (or asked for), else CPU."""
    ort = import_onnxruntime(gpu=device == "cuda")
    available = ort.get_available_providers()
    if providers is not None:
        if isinstance(providers, str):
            providers = [p.strip() for p in providers.split(",") if p.strip()]
        if not providers:
            raise ConfigError(
                f"providers is empty; name at least one execution provider ({', '.join(available)}), or leave "
                "providers unset and choose a device"
            )
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        unknown = [p for p in names if p not in available]
        if unknown:
            extra = " Install onnxruntime-gpu: pip install 'anytime[gpu]'." if CUDA in unknown else ""
            raise ConfigError(
                f"execution provider(s) {unknown} are not available in this onnxruntime; available: {available}.{extra}"
            )
        return list(providers)
    device = (device or "auto").lower()
    if device not in DEVICES:
        raise ConfigError(f"device {device!r} is unknown; use one of {', '.join(DEVICES)}")
    if device == "cpu":
        return [CPU]
    if device == "cuda" and CUDA not in available:
        raise MissingDependencyError(
            f"device 'cuda' needs onnxruntime-gpu with CUDA (available providers: {available}). "
            "Install it with: pip install 'anytime[gpu]' (and uninstall onnxruntime), or use --device cpu"
        )
    return [CUDA, CPU] if CUDA in available else [CPU]


def create_session(
    path: str | Path,
    providers: Sequence[Any],
    threads: int | None = None,
    spinning: bool = False,
    shared_pool: bool = False,
) -> Any:
    """One onnxruntime session for one graph, with the options every anytime session uses.

    `threads`, `spinning`, `shared_pool`: see `anytime.runtime.threadpool.configure_threads`."""
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    ort = import_onnxruntime(gpu=CUDA in names)
    if CUDA in names:
        preload_cuda_libraries(ort)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers etc. on stderr
    configure_threads(options, threads, spinning, shared_pool)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own (non-exported) exception types
        raise BundleError(f"onnxruntime cannot load {path} ({exc}); re-export the bundle") from exc


@dataclass
class BatchTrace:
    """What one early-exit batch did: rows entering each stage and seconds spent per stage."""

    rows_per_stage: list[int] = field(default_factory=list)
    stage_seconds: list[float] = field(default_factory=list)  # session runs alone
    overhead_seconds: float = 0.0  # host-side work between session runs (softmax, masks, compaction)
    total_cost: float = 0.0
    # The whole batch's wall time split by stage (what a latency profile prices): step_seconds[k] is stage
    # k's session run plus its exit test and bookkeeping (stage 0 also the batch's set-up); gather_seconds[k]
    # the copy of the rows that enter stage k (0 for the first stage and for rows passed on without a copy).
    step_seconds: list[float] = field(default_factory=list)
    gather_seconds: list[float] = field(default_factory=list)


class StageExecutor:
    """One onnxruntime session per stage plus the early-exit loop over them."""

    bundle: Bundle | None  # None for `for_graphs` (graphs without a manifest)

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[Any] | str | None = None,
        device: str | None = None,
        threads: int | None = None,
        spinning: bool = False,
        io_binding: bool | str = "auto",
        thread_pool: str = "session",
    ) -> None:
        self.bundle = bundle
        self._setup(
            bundle.path,
            bundle.stages,
            bundle.input.name,
            bundle.exit_costs,
            providers,
            device,
            threads,
            spinning,
            io_binding,
            thread_pool,
        )

    @classmethod
    def for_graphs(
        cls,
        paths: Sequence[str | Path],
        io: Sequence[tuple[Sequence[str], Sequence[str], str]],
        input_name: str,
        providers: Sequence[Any] | str | None = None,
    ) -> "StageExecutor":
        """An executor over stage graphs that have no manifest yet (the export validates with it):
        `io` holds each graph's (inputs, outputs, logits name)."""
        graph_paths = [Path(p) for p in paths]
        if len({p.parent for p in graph_paths}) > 1:
            raise ConfigError("stage graphs must be in one directory")
        stages = tuple(
            StageSpec(k, p.name, tuple(i), tuple(o), logits, float(k + 1), None, None, None)
            for k, (p, (i, o, logits)) in enumerate(zip(graph_paths, io))
        )
        executor = cls.__new__(cls)
        executor.bundle = None
        executor._setup(
            graph_paths[0].parent,
            stages,
            input_name,
            np.array([s.cost for s in stages]),
            providers or [CPU],
            None,
            None,
            False,
            False,
            "session",
        )
        return executor

    def _setup(
        self,
        directory: Path,
        stages: Sequence[StageSpec],
        input_name: str,
        costs: np.ndarray,
        providers: Sequence[Any] | str | None,
        device: str | None,
        threads: int | None,
        spinning: bool,
        io_binding: bool | str,
        thread_pool: str,
    ) -> None:
        wanted = resolve_providers(providers, device)
        self.sessions = []
        with deciding_pool(thread_pool, threads) as (self.thread_pool, self.threads):
            for stage in stages:
                session = create_session(
                    directory / stage.file, wanted, self.threads, spinning, shared_pool=self.thread_pool == "shared"
                )
                self._check_io(session, stage)
                self.sessions.append(session)
        in_use = self.sessions[0].get_providers()
        wanted_names = [p[0] if isinstance(p, tuple) else p for p in wanted]
        missing = [p for p in wanted_names if p not in in_use]
        if missing:
            # A CUDA provider that fails to initialise falls back to CPU without an error; say so.
            log.warning(
                "execution provider(s) %s were requested but are not in use (onnxruntime uses %s)", missing, in_use
            )
        self.providers = list(in_use)
        self.on_gpu = CUDA in in_use
        self.input_name = input_name
        self.costs = costs
        self._out_names = [list(s.outputs) for s in stages]
        self._logit_pos = [s.outputs.index(s.logits) for s in stages]
        self._state_names = [list(s.state_outputs) for s in stages]
        # Host arrays the rows that go on are copied into, kept between batches (anytime.runtime.buffers).
        self.gather_buffers = BufferPool()
        self.queue_buffers = BufferPool()  # the refilling scheduler's
        self._setup_io_binding(io_binding, wanted)

    def _setup_io_binding(self, io_binding: bool | str, wanted: Sequence[Any]) -> None:
        """`device_type` (None: plain path) and, per stage boundary, the row operations on the device."""
        self.device_type = resolve_io_binding(io_binding, self.providers)
        self.device_id = 0
        # _device_rows[k]: gather/concat of the state that enters stage k (k >= 1; stage 0 gets host input).
        self._device_rows: list[DeviceRows | None] = [None] * self.num_exits
        if self.device_type is None:
            return
        first = self.providers[0]
        self.device_id = int(self.sessions[0].get_provider_options().get(first, {}).get("device_id", 0) or 0)
        ort = import_onnxruntime(gpu=self.on_gpu)
        for k in range(1, self.num_exits):
            produced = {o.name: o for o in self.sessions[k - 1].get_outputs()}
            names = self._state_names[k - 1]
            self._device_rows[k] = DeviceRows(
                ort,
                names,
                [produced[n].type for n in names],
                [len(produced[n].shape) for n in names],
                self.device_type,
                self.device_id,
                list(wanted),
            )
        log.info("IO binding on %s: stage state tensors stay on the device", self.device_type)

    @property
    def io_binding(self) -> bool:
        return self.device_type is not None

    @staticmethod
    def _check_io(session: Any, stage: Any) -> None:
        ins = {i.name for i in session.get_inputs()}
        outs = {o.name for o in session.get_outputs()}
        if ins != set(stage.inputs) or not set(stage.outputs) <= outs:
            raise BundleError(
                f"{stage.file}: graph inputs {sorted(ins)} / outputs {sorted(outs)} do not match the manifest "
                f"({list(stage.inputs)} / {list(stage.outputs)}); re-export the bundle"
            )

    @property
    def num_exits(self) -> int:
        return len(self.sessions)

    def _run(self, k: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[k].run(self._out_names[k], feeds)

    # --- stage steps (a state: the dict of tensors entering a stage) --------------------------------------
    def start(self, x: np.ndarray) -> dict[str, Any]:
        """The state entering stage 0: the normalised input batch (always on the host)."""
        return {self.input_name: x}

    def run_stage(self, k: int, state: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Run stage k on a state: (its logits on the host, the state entering stage k+1; {} after the last)."""
        if self.device_type is None:
            outs = self._run(k, state)
            names = self._out_names[k]
            return outs[self._logit_pos[k]], {n: outs[names.index(n)] for n in self._state_names[k]}
        session = self.sessions[k]
        binding = session.io_binding()
        for name, value in state.items():
            bind_input(binding, name, value)
        logits_name = self._out_names[k][self._logit_pos[k]]
        bound = [logits_name] + self._state_names[k]
        binding.bind_output(logits_name, "cpu")  # only the logits come to the host
        for name in self._state_names[k]:
            binding.bind_output(name, self.device_type, self.device_id)
        session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy(), dict(zip(bound[1:], list(outs)[1:]))

    def free_buffers(self) -> None:
        """Free the host buffers kept between batches and schedulers (about one batch of every stage's state)."""
        self.gather_buffers.clear()
        self.queue_buffers.clear()

    def take_rows(
        self, k: int, state: dict[str, Any], rows: np.ndarray | slice, out: Buffers | None = None
    ) -> dict[str, Any]:
        """The given rows (0-based indices in that order, or a slice) of a state entering stage k; host
        arrays are copied into `out`'s first rows when given (views of them are returned)."""
        ops = self._device_rows[k]
        if ops is None or all(isinstance(v, np.ndarray) for v in state.values()):
            if out is None:
                return {n: v[rows] for n, v in state.items()}
            taken = {}
            for n, v in state.items():
                count = len(range(*rows.indices(v.shape[0]))) if isinstance(rows, slice) else rows.size
                taken[n] = out[n][:count]
                copy_rows(v, rows, taken[n])
            return taken
        if isinstance(rows, slice):
            rows = np.arange(rows.start or 0, rows.stop)
        return ops.gather(state, rows)

    def join_rows(self, k: int, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """States entering stage k, joined along the rows in the given order."""
        if len(states) == 1:
            return states[0]
        ops = self._device_rows[k]
        if ops is None or all(isinstance(v, np.ndarray) for s in states for v in s.values()):
            return {n: np.concatenate([s[n] for s in states]) for n in states[0]}
        return ops.concat(states)

    def run_all(self, x: np.ndarray) -> np.ndarray:
        """Logits of every exit for the whole batch, (K, N, C): the reference that early exit must match."""
        feeds = {self.input_name: x}
        logits = []
        for k in range(self.num_exits):
            outs = self._run(k, feeds)
            logits.append(outs[self._logit_pos[k]])
            feeds = {name: outs[self._out_names[k].index(name)] for name in self._state_names[k]}
        return np.stack(logits)

    def run_early_exit(
        self,
        x: np.ndarray,
        thresholds: np.ndarray,
        cap_per_image: float | None = None,
        profile_rows: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, BatchTrace]:
        """Early exit over one batch: (labels, confidences, 0-based exits, trace).

        `cap_per_image` (strict mode): the batch's total cost never exceeds n × cap (to 1e-12, rounding). When the thresholds
        would send more samples on than the remaining budget pays for, the least confident continue and
        the rest answer at the exit they have reached.

        `profile_rows` (latency profiling, which times a later stage's call on r rows where serving makes it:
        after a full first stage): the first `profile_rows` rows go on through every stage whatever the
        thresholds, the others answer at the first exit, and the rows that go on are gathered at every stage
        boundary even when they are all the rows, as a compacted batch's are.
        """
        t_start = time.perf_counter()
        n = x.shape[0]
        k_exits = self.num_exits
        thresholds = np.asarray(thresholds, dtype=np.float32)
        labels = np.empty(n, dtype=np.int64)
        confidence = np.empty(n, dtype=np.float32)
        exits = np.empty(n, dtype=np.int64)
        trace = BatchTrace(gather_seconds=[0.0] * k_exits)
        active = np.arange(n)
        state = self.start(x)
        lent: dict[int, Buffers] = {}  # gather buffers taken from the pool for this batch
        costs = self.costs
        spent = n * float(costs[0])
        cap_total = None if cap_per_image is None else n * float(cap_per_image)
        # The running total rounds where costs are not whole numbers (seconds from a latency profile): a slack
        # far below any stage's cost keeps a cap that pays exactly for the rows going on (100%, say) from
        # stopping one of them early.
        slack = 0.0 if cap_total is None else 1e-12 * cap_total
        for k in range(k_exits):
            trace.rows_per_stage.append(int(active.size))
            t0 = time.perf_counter()
            logits, state = self.run_stage(k, state)
            t1 = time.perf_counter()
            trace.stage_seconds.append(t1 - t0)
            conf, pred = softmax_confidence(logits)
            if k == k_exits - 1:
                leave = np.ones(active.size, dtype=bool)
            elif profile_rows is not None:
                leave = np.zeros(active.size, dtype=bool)
                leave[profile_rows:] = True
            else:
                leave = conf >= thresholds[k]
                if cap_total is not None:
                    leave = self._apply_cap(leave, conf, cap_total - spent + slack, float(costs[k + 1] - costs[k]))
                    spent += float((~leave).sum()) * float(costs[k + 1] - costs[k])
            if leave.all():
                idx = active
                labels[idx], confidence[idx], exits[idx] = pred, conf, k
                t_end = time.perf_counter()
                trace.overhead_seconds += t_end - t1
                trace.step_seconds.append(t_end - (t_start if k == 0 else t0))
                break
            gather = 0.0
            if leave.any() or profile_rows is not None:
                idx = active[leave]
                labels[idx], confidence[idx], exits[idx] = pred[leave], conf[leave], k
                keep = np.flatnonzero(~leave)
                active = active[keep]
                tg = time.perf_counter()
                if all(isinstance(v, np.ndarray) for v in state.values()):
                    lent[k + 1] = self.gather_buffers.take(k + 1, n, state)
                state = self.take_rows(k + 1, state, keep, out=lent.get(k + 1))
                gather = time.perf_counter() - tg
                trace.gather_seconds[k + 1] = gather
            t_end = time.perf_counter()
            trace.overhead_seconds += t_end - t1
            trace.step_seconds.append(t_end - (t_start if k == 0 else t0) - gather)
        for stage, buffers in lent.items():
            self.gather_buffers.give_back(stage, buffers)
        trace.total_cost = float(costs[exits].sum())
        return labels, confidence, exits, trace

    @staticmethod
    def _apply_cap(leave: np.ndarray, conf: np.ndarray, remaining: float, step_cost: float) -> np.ndarray:
        """Let at most remaining/step_cost samples go on: the least confident of those that want to."""
        want = np.flatnonzero(~leave)
        if step_cost <= 0 or want.size == 0:
            return leave
        allowed = max(0, int(math.floor(remaining / step_cost + 1e-9)))
        while allowed > 0 and allowed * step_cost > remaining:  # guard the epsilon above
            allowed -= 1
        if want.size <= allowed:
            return leave
        leave = leave.copy()
        order = want[np.argsort(conf[want], kind="stable")]  # least confident first
        leave[order[allowed:]] = True
        return leave
