"""`AnytimeModel`: a loaded bundle that calibrates exit policies and predicts with real early exit."""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from anytime.errors import AnytimeError, BudgetError, ConfigError, InputImageError
from anytime.formats.bundle import Bundle, read_bundle
from anytime.formats.preprocessing import DEFAULT_MAX_PIXELS, Preprocessor, is_binary_file
from anytime.formats.profile import LatencyProfile
from anytime.runtime.budget import (
    TIME_CONVENTION,
    BudgetLike,
    check_exit,
    format_cost,
    format_seconds,
    parse_budget,
    resolve_budget_cost,
)
from anytime.runtime.calibration import (
    ExitPolicy,
    ValidationData,
    fit_geometric,
    fit_search,
    fixed_exit_policy,
    search_frontier,
)
from anytime.runtime.costmodel import COST_MODES, TimeCost
from anytime.runtime.engine import StageExecutor
from anytime.runtime.inputs import InputItem, MissingInput, is_one_path, iter_input_items
from anytime.runtime.profiling import check_profile, measure_profile
from anytime.runtime.results import Predictions, concat
from anytime.runtime.scheduler import Answered, RefillingScheduler, StageCalls

log = logging.getLogger(__name__)

POLICY_CHOICES = ("best", "geometric", "search")
SCHEDULER_CHOICES = ("auto", "refill", "batch")
PolicyLike = ExitPolicy | str | os.PathLike
ProfileLike = LatencyProfile | str | os.PathLike


_P = TypeVar("_P", bound="PolicyLike | None")


def _renamed_method(policy: _P, method: str | None, where: str) -> _P | str:
    """`method=` was the old name of `policy=` (the CLI always said --policy); keep it working."""
    if method is None:
        return policy
    warnings.warn(f"{where}(method=...) is deprecated; use policy={method!r}", DeprecationWarning, stacklevel=3)
    return method


class AnytimeModel:
    """A multi-exit classifier bundle on ONNX Runtime.

    `calibrate(budget)` fits an exit policy on the bundle's validation logits; `predict(inputs, budget=...)`
    runs batched early exit and returns `Predictions`.
    """

    def __init__(
        self,
        bundle: Bundle,
        executor: StageExecutor,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        workers: int | None = None,
        profile: ProfileLike | None = None,
        cost_mode: str = "auto",
    ) -> None:
        self.bundle = bundle
        self.executor = executor
        self.preprocessor = Preprocessor(bundle.input, max_pixels=max_pixels)
        self.workers = max(1, min(4, os.cpu_count() or 1)) if workers is None else max(1, int(workers))
        self._validation: ValidationData | None = None
        self._policies: dict[tuple[float, str, str, int | None], dict[str, ExitPolicy]] = {}
        self._frontiers: dict[tuple[str, int | None], tuple[ExitPolicy, ...]] = {}
        if cost_mode not in (*COST_MODES, "auto"):
            raise ConfigError(f"cost_mode={cost_mode!r} is unknown; use one of auto, {', '.join(COST_MODES)}")
        # auto: as the executor a stream runs on by default (`_choose_scheduler`): refilling on a GPU, per batch on CPU
        self.cost_mode = cost_mode if cost_mode != "auto" else "full-batches" if executor.on_gpu else "per-batch"
        self.latency_profile: LatencyProfile | None = None
        if profile is not None:
            self.use_profile(profile)

    # --- latency profiles ----------------------------------------------------------------------------
    def profile(self, batch_size: int = 64, repeats: int = 15, warmup: int = 2) -> LatencyProfile:
        """Measure each stage's time per call on this machine and provider at the row counts early exit
        produces (1, 2, 4, ..., batch_size); `.save(path)` it, or `use_profile` it to budget in time."""
        return measure_profile(self.bundle, self.executor, batch_size=batch_size, repeats=repeats, warmup=warmup)

    def use_profile(self, profile: ProfileLike | None) -> None:
        """Make time the cost convention (a `LatencyProfile` or its JSON file), or go back to the bundle's
        convention with None. A profile of another bundle or provider is refused."""
        if profile is None:
            self.latency_profile = None
        else:
            where = ""
            if not isinstance(profile, LatencyProfile):
                where = f"'{profile}'"
                profile = LatencyProfile.load(profile)
            check_profile(profile, self.bundle, self.executor, where)
            self.latency_profile = profile
        # The executor's strict cap and each result row's cost are priced per image in the convention in use.
        self.executor.costs = self.exit_costs
        self._validation = None
        self._policies.clear()
        self._frontiers.clear()

    def time_cost(self, cost_mode: str | None = None, batch_size: int | None = None) -> TimeCost | None:
        """The time cost model in use (None without a profile); `cost_mode` overrides the model's. `batch_size`:
        the rows of a batch that `per-batch` compacts (default: the profile's batch size)."""
        if self.latency_profile is None:
            return None
        return TimeCost(self.latency_profile, cost_mode or self.cost_mode, batch_size)

    # --- description ---------------------------------------------------------------------------------
    @property
    def classes(self) -> tuple[str, ...]:
        return self.bundle.classes

    @property
    def num_exits(self) -> int:
        return self.bundle.num_exits

    @property
    def exit_costs(self) -> np.ndarray:
        """Cumulative cost per image of each exit in the convention in use: the bundle's, or seconds
        (every stage on full batches) with a latency profile."""
        if self.latency_profile is not None:
            return self.latency_profile.exit_seconds
        return self.bundle.exit_costs

    @property
    def cost_convention(self) -> str:
        return TIME_CONVENTION if self.latency_profile is not None else self.bundle.cost_convention

    @property
    def full_cost(self) -> float:
        return float(self.exit_costs[-1])

    @property
    def providers(self) -> list[str]:
        return list(self.executor.providers)

    def __repr__(self) -> str:
        b, spec = self.bundle, self.bundle.input
        classes = ", ".join(self.classes[:10]) + (", ..." if len(self.classes) > 10 else "")
        lines = [
            f"AnytimeModel {b.arch} from {b.path}",
            f"  input: {spec.channels}×{spec.height}×{spec.width} {spec.color}"
            + (f", resize {spec.resize}" if spec.resize else ""),
            f"  {len(self.classes)} classes: {classes}",
            f"  providers: {', '.join(self.providers)}",
            f"  exit  cost ({b.cost_convention})  of full  val accuracy",
        ]
        full = float(b.exit_costs[-1])
        for i, s in enumerate(b.stages):
            acc = "-" if s.val_accuracy is None else f"{100 * s.val_accuracy:.2f}%"
            lines.append(f"  {i + 1:>4}  {format_cost(s.cost):>12}  {100 * s.cost / full:>6.1f}%  {acc:>12}")
        if self.latency_profile is not None:
            secs = self.latency_profile.exit_seconds
            lines.append(
                "  time per image (latency profile, full batches): "
                + ", ".join(f"{format_seconds(t)} ({100 * t / secs[-1]:.0f}%)" for t in secs)
            )
        return "\n".join(lines)

    # --- calibration ---------------------------------------------------------------------------------
    def validation_data(self, cost_mode: str | None = None, batch_size: int | None = None) -> ValidationData:
        """The calibration split, priced in the convention in use (`cost_mode`, `batch_size`: how time is
        counted, as in `calibrate_all`)."""
        if self._validation is None:
            logits, labels = self.bundle.load_calibration()
            self._validation = ValidationData(logits, labels, self.exit_costs)
        time_cost = self.time_cost(cost_mode, batch_size)
        if time_cost is None or time_cost.linear:
            return self._validation
        return self._validation.with_cost_model(time_cost)

    def budget_cost(self, budget: BudgetLike) -> float:
        """A budget as an average cost per image; raises BudgetError with the feasible range."""
        return resolve_budget_cost(parse_budget(budget), self.exit_costs, self.cost_convention)

    def calibrate_all(
        self, budget: BudgetLike, cost_mode: str | None = None, *, batch_size: int | None = None
    ) -> dict[str, ExitPolicy]:
        """Both policies for a budget: {"geometric", "search", "best"} (best: higher validation accuracy).

        `cost_mode` (with a latency profile): "full-batches" or "per-batch", how the time of a policy is
        counted; default the model's `cost_mode`. `batch_size`: the batch that "per-batch" prices, the one
        prediction runs (default: the profile's batch size)."""
        parsed = parse_budget(budget)
        if parsed.kind == "exit":
            p = self._exit_policy(int(parsed.value))
            return {"geometric": p, "search": p, "best": p}
        cost = resolve_budget_cost(parsed, self.exit_costs, self.cost_convention)
        mode = (cost_mode or self.cost_mode) if self.latency_profile is not None else ""
        rows = int(batch_size) if batch_size is not None and mode == "per-batch" else None
        key = (cost, parsed.text, mode, rows)
        if key not in self._policies:
            data = self.validation_data(cost_mode, rows)
            t0 = time.perf_counter()
            geo = fit_geometric(data, cost, self.cost_convention, parsed.text)
            if geo.expected_cost > cost * (1 + 1e-9):
                raise self._below_cheapest(parsed.text, cost, mode, rows)
            t1 = time.perf_counter()
            frontier_key = (mode, rows)
            if frontier_key not in self._frontiers:
                self._frontiers[frontier_key] = search_frontier(data, self.cost_convention)
            search = fit_search(
                data,
                cost,
                self.cost_convention,
                start=geo,
                budget_text=parsed.text,
                frontier=self._frontiers[frontier_key],
            )
            t2 = time.perf_counter()
            log.debug("calibration for %s: geometric %.3fs, search %.3fs", parsed.text, t1 - t0, t2 - t1)
            # The searched policy starts from the geometric one and never scores lower on validation;
            # prefer geometric on a tie because it extrapolates more smoothly.
            best = search if search.expected_accuracy > geo.expected_accuracy else geo
            if mode:
                for fitted in (geo, search):
                    fitted.info["cost_mode"] = mode
                    if rows is not None:
                        fitted.info["batch_size"] = rows
            self._policies[key] = {"geometric": geo, "search": search, "best": best}
        return self._policies[key]

    def cheapest_cost(self, cost_mode: str | None = None, batch_size: int | None = None) -> float:
        """Cost per image of the cheapest policy, every image at exit 1, priced as `calibrate_all` prices it
        (`cost_mode`): at most the first exit's cost, except on full batches with a profile that prices the
        refilling scheduler's own work (`refill_overhead_seconds`), which that work adds to."""
        return self.validation_data(cost_mode, batch_size).evaluate(np.full(self.num_exits, -np.inf))[0]

    def _below_cheapest(self, text: str, cost: float, mode: str, batch_size: int | None = None) -> BudgetError:
        cheapest = self.cheapest_cost(mode or None, batch_size)
        overhead = self.latency_profile.refill_overhead_priced if self.latency_profile is not None else 0.0
        refill = mode == "full-batches" and overhead != 0.0
        full = float(self.exit_costs[-1])
        return BudgetError(
            f"budget {text} ({format_cost(cost, self.cost_convention)} per image) is below the cheapest policy's "
            f"cost: every image at exit 1 takes {format_cost(cheapest, self.cost_convention)}"
            + (
                f" with the refilling scheduler's own work ({format_seconds(overhead)} per row and stage)"
                if refill
                else ""
            )
            + (
                f" in batches of {batch_size} rows (the profile timed batches of {self.latency_profile.batch_size})"
                if batch_size is not None
                and self.latency_profile is not None
                and batch_size != self.latency_profile.batch_size
                else ""
            )
            + f"; feasible budgets are {format_cost(cheapest, self.cost_convention)} to "
            f"{format_cost(full, self.cost_convention)} per image ({100 * cheapest / full:.1f}% to 100%)"
            + (", or serve with the per-batch executor (--scheduler batch), which has no such work" if refill else "")
        )

    def calibrate(
        self,
        budget: BudgetLike,
        policy: str = "best",
        *,
        method: str | None = None,
        cost_mode: str | None = None,
        batch_size: int | None = None,
    ) -> ExitPolicy:
        """The exit policy for a budget, fitted on the bundle's validation data.

        `policy`: "geometric" (MSDNet's), "search", or "best" (whichever scores higher on validation).
        """
        policy = _renamed_method(policy, method, "calibrate")
        if policy not in POLICY_CHOICES:
            raise ConfigError(f"policy {policy!r} is unknown; use one of {', '.join(POLICY_CHOICES)}")
        return self.calibrate_all(budget, cost_mode, batch_size=batch_size)[policy]

    def _exit_policy(self, exit_number: int) -> ExitPolicy:
        exit_number = check_exit(exit_number, self.num_exits)
        try:
            data = self.validation_data()
        except AnytimeError:
            data = None
        return fixed_exit_policy(data, exit_number, self.exit_costs, self.cost_convention)

    def resolve_policy(
        self,
        budget: BudgetLike | None = None,
        policy: PolicyLike | None = "best",
        exit: int | None = None,
        *,
        method: str | None = None,
        cost_mode: str | None = None,
        batch_size: int | None = None,
    ) -> ExitPolicy:
        """The policy a prediction uses. `policy` is how a budget becomes thresholds (best, geometric,
        search), or a ready policy: an `ExitPolicy` or the JSON file `calibrate -o` writes (then no budget).
        `cost_mode` and `batch_size` as in `calibrate_all`."""
        policy = _renamed_method(policy, method, "resolve_policy")
        name: str | None
        if policy is None:
            name = "best"
        elif isinstance(policy, str) and policy in POLICY_CHOICES:
            name = policy
        else:
            name = None
        if name is None:
            if isinstance(policy, (str, os.PathLike)) and not os.path.isfile(policy):
                raise ConfigError(
                    f"policy {str(policy)!r} is neither {', '.join(POLICY_CHOICES)} nor an existing policy file "
                    "(written by `anytime calibrate --budget B -o FILE`)"
                )
            given = [n for n, v in (("budget", budget), ("exit", exit)) if v is not None]
            if given:
                raise ConfigError(f"a ready exit policy fixes the thresholds; give it without {' or '.join(given)}")
            if isinstance(policy, (str, os.PathLike)):
                policy = ExitPolicy.load(policy)
            if not isinstance(policy, ExitPolicy):
                raise ConfigError(
                    f"policy={policy!r}: give {', '.join(POLICY_CHOICES)}, an ExitPolicy or a policy JSON file path"
                )
            if policy.num_exits != self.num_exits:
                raise ConfigError(
                    f"the exit policy has {policy.num_exits} thresholds but this model has {self.num_exits} exits"
                )
            if policy.budget is not None and policy.cost_convention != self.cost_convention:
                hint = (
                    "load the model with the latency profile it was calibrated with (--profile FILE)"
                    if policy.cost_convention == TIME_CONVENTION
                    else "calibrate it again with the latency profile in use"
                )
                raise ConfigError(
                    f"the exit policy's budget is in {policy.cost_convention} but this model's costs are in "
                    f"{self.cost_convention}; {hint}"
                )
            return policy
        if budget is not None and exit is not None:
            raise ConfigError("give only one of budget or exit (got budget and exit)")
        if exit is not None:
            return self._exit_policy(exit)
        if budget is not None:
            return self.calibrate(budget, name, cost_mode=cost_mode, batch_size=batch_size)
        return self._exit_policy(self.num_exits)  # nothing asked: the full network

    # --- prediction ----------------------------------------------------------------------------------
    def predict(
        self,
        inputs: Any,
        budget: BudgetLike | None = None,
        policy: PolicyLike | None = "best",
        exit: int | None = None,
        batch_size: int = 64,
        strict: bool = False,
        on_error: str = "raise",
        scheduler: str = "auto",
        ordered: bool = True,
        max_wait_rows: int | None = None,
        stage_calls: StageCalls | None = None,
        *,
        method: str | None = None,
    ) -> Predictions:
        """Classify inputs with real batched early exit under a budget, a policy or a fixed exit.

        `inputs`: a path (taken as `anytime serve` takes it: a folder's images, recursively; the files a glob
        pattern matches; the files a Parquet or JSONL path list names), PIL image, encoded image bytes (or a
        binary file object holding them), H×W×C uint8 array, N×H×W×C array, or an iterable of these (consumed
        lazily, `batch_size` at a time). `policy`: how the budget becomes thresholds ("best", "geometric",
        "search"), or a ready `ExitPolicy` / policy JSON file. With neither budget, exit nor a ready
        policy the full network answers.
        `strict`: each batch's total cost never exceeds images × budget. `on_error`: "raise" stops at
        the first unreadable input; "record" gives it an error row and goes on.
        `scheduler`: "refill" keeps a queue of waiting rows per stage so that every stage runs on full
        batches of `batch_size` (see `anytime.runtime.scheduler`); "batch" runs each batch through the
        stages on its own, compacting it after each exit; "auto" refills streams longer than one batch on
        a GPU unless `strict` (whose cap is per batch), and runs per batch on CPU, where refilling was
        measured not to pay. Answers are the same either way. `ordered=False`
        releases answers as they are ready rather than in input order (refill only). `max_wait_rows`:
        no input waits while more later inputs than this are admitted (default 16 batches).
        `stage_calls`: a `StageCalls` to fill with every stage call's rows and seconds.
        """
        policy = _renamed_method(policy, method, "predict")
        t0 = time.perf_counter()
        parts = list(
            self.predict_batches(
                inputs,
                budget=budget,
                policy=policy,
                exit=exit,
                batch_size=batch_size,
                strict=strict,
                on_error=on_error,
                scheduler=scheduler,
                ordered=ordered,
                max_wait_rows=max_wait_rows,
                stage_calls=stage_calls,
            )
        )
        seconds = time.perf_counter() - t0
        if not parts:
            raise ConfigError("predict() got no inputs; pass a path, an image, an array or a non-empty list of them")
        result = concat(parts, seconds=seconds)
        n = max(result.images, 1)
        pre = sum(p.speed.get("preprocess_s", 0.0) for p in parts)
        inf = sum(p.speed.get("inference_s", 0.0) for p in parts)
        result.speed = {"preprocess": 1e3 * pre / n, "inference": 1e3 * inf / n, "total": 1e3 * seconds / n}
        return result

    def predict_batches(
        self,
        inputs: Any,
        budget: BudgetLike | None = None,
        policy: PolicyLike | None = "best",
        exit: int | None = None,
        batch_size: int = 64,
        strict: bool = False,
        on_error: str = "record",
        scheduler: str = "auto",
        ordered: bool = True,
        max_wait_rows: int | None = None,
        stage_calls: StageCalls | None = None,
        *,
        method: str | None = None,
    ) -> Iterator[Predictions]:
        """Like `predict`, but yields `Predictions` as answers are ready, so memory stays bounded.

        With the per-batch scheduler each part is one input batch (two batches in memory at most). With
        the refilling one a part is one input batch once all of its inputs are answered (`ordered`), or
        the inputs answered by then (`ordered=False`); waiting rows are bounded as the scheduler module
        describes. When an iterable of inputs raises, every input it gave before the error is answered and
        yielded, and then its error is raised; an unreadable input with on_error="raise" is raised after the
        batches before its own.
        """
        if on_error not in ("raise", "record"):
            raise ConfigError(f"on_error={on_error!r}: use 'raise' or 'record'")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        batch_size = int(batch_size)
        mode = _choose_scheduler(scheduler, strict, inputs, batch_size, on_gpu=self.executor.on_gpu)
        # With a latency profile, a policy is priced as its executor runs: the per-batch executor (and a strict
        # cap, which holds per batch) compacts every batch stage by stage; the refilling one runs full batches.
        cost_mode = "per-batch" if mode == "batch" else "full-batches"
        chosen = self.resolve_policy(
            budget, _renamed_method(policy, method, "predict_batches"), exit, cost_mode=cost_mode, batch_size=batch_size
        )
        thresholds = chosen.threshold_array()
        if strict and chosen.budget is None:
            raise ConfigError(
                "strict=True caps a budget; it has no meaning with a fixed exit (exit=) or the full network"
            )
        cap = chosen.budget if strict else None
        # Everything above is checked when called; the parts below are made as they are asked for.
        if mode == "batch":
            return self._per_batch_parts(inputs, batch_size, on_error, thresholds, cap, chosen, stage_calls)
        refill = RefillingScheduler(self.executor, thresholds, batch_size, ordered, max_wait_rows, stage_calls)
        return self._refilled_parts(inputs, batch_size, on_error, refill, chosen)

    def _per_batch_parts(
        self,
        inputs: Any,
        batch_size: int,
        on_error: str,
        thresholds: np.ndarray,
        cap: float | None,
        chosen: ExitPolicy,
        stage_calls: StageCalls | None,
    ) -> Iterator[Predictions]:
        for loaded in self._loaded_batches(inputs, batch_size, on_error):
            yield self._infer_batch(loaded, thresholds, cap, chosen, stage_calls)

    def _refilled_parts(
        self, inputs: Any, batch_size: int, on_error: str, refill: RefillingScheduler, chosen: ExitPolicy
    ) -> Iterator[Predictions]:
        preprocess = inference = 0.0  # seconds not yet reported in a yielded part
        batches = self._loaded_batches(inputs, batch_size, on_error)
        failed: Exception | None = None
        while True:
            try:
                loaded = next(batches, None)
            except Exception as exc:
                # From the inputs (the source raised, or an unreadable one with on_error="raise"): what was admitted
                # before is answered first, as the per-batch executor has answered it by then.
                failed = exc
                break
            if loaded is None:
                break
            preprocess += loaded.pop("seconds")
            x, ok = loaded.pop("x"), loaded.pop("ok")  # the reorder buffer keeps no images
            t0 = time.perf_counter()
            answered = refill.add(x, ok, len(loaded["names"]), loaded)
            inference += time.perf_counter() - t0
            for part in answered:
                yield self._answered(part, chosen, preprocess, inference)
                preprocess = inference = 0.0
        t0 = time.perf_counter()
        answered = refill.finish()
        inference += time.perf_counter() - t0
        for part in answered:
            yield self._answered(part, chosen, preprocess, inference)
            preprocess = inference = 0.0
        if failed is not None:
            raise failed

    def _loaded_batches(self, inputs: Any, batch_size: int, on_error: str) -> Iterator[dict[str, Any]]:
        """Decoded batches of `batch_size` inputs; batch i+1 decodes while batch i is being answered."""
        chunks = _chunks(iter_input_items(inputs, self.classes), batch_size)
        with ThreadPoolExecutor(max_workers=1) as prefetch, ThreadPoolExecutor(max_workers=self.workers) as decode:
            # onnxruntime releases the GIL, so decoding overlaps inference: at most two batches in memory.
            pending: Future | None = None
            chunk = next(chunks, None)
            if chunk is not None:
                pending = prefetch.submit(self._load_batch, chunk, decode, on_error)
            while pending is not None:
                loaded = pending.result()
                try:
                    nxt = next(chunks, None)
                except Exception:
                    yield loaded  # the source raised: the batch before the error is answered first
                    raise
                pending = prefetch.submit(self._load_batch, nxt, decode, on_error) if nxt is not None else None
                yield loaded

    def _load_batch(self, chunk: list[InputItem], pool: ThreadPoolExecutor, on_error: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        names = [it.name for it in chunk]
        errors: list[str | None] = [None] * len(chunk)
        arrays: list[np.ndarray | None] = [None] * len(chunk)

        def load(i: int) -> None:
            item = chunk[i]
            if isinstance(item.source, MissingInput):
                errors[i] = item.source.reason
                return
            try:
                arrays[i] = self.preprocessor.to_array(item.source, item.name or f"<input {i}>")
            except InputImageError as exc:
                errors[i] = str(exc)

        paths = sum(isinstance(it.source, str) for it in chunk)
        if paths > 1 and self.workers > 1:
            # One contiguous share of the batch per thread: a task per image cost more than decoding a small one.
            shares = np.array_split(np.arange(len(chunk)), min(self.workers, len(chunk)))

            def load_share(share: np.ndarray) -> None:
                for i in share:
                    load(int(i))

            list(pool.map(load_share, shares))
        else:
            for i in range(len(chunk)):
                load(i)
        if on_error == "raise":
            for e in errors:
                if e is not None:
                    raise InputImageError(e)
        loaded = [(i, a) for i, a in enumerate(arrays) if a is not None]
        ok = [i for i, _ in loaded]
        x = self.preprocessor.normalise(np.stack([a for _, a in loaded])) if loaded else None
        return {
            "names": names,
            "errors": errors,
            "ok": np.asarray(ok, dtype=np.int64),
            "x": x,
            "true": np.asarray([it.true_label for it in chunk], dtype=np.int64),
            "seconds": time.perf_counter() - t0,
        }

    def _infer_batch(
        self,
        loaded: dict[str, Any],
        thresholds: np.ndarray,
        cap: float | None,
        chosen: ExitPolicy,
        stage_calls: StageCalls | None = None,
    ) -> Predictions:
        n = len(loaded["names"])
        labels = np.full(n, -1, dtype=np.int64)
        conf = np.zeros(n, dtype=np.float32)
        exits = np.zeros(n, dtype=np.int64)
        costs = np.full(n, math.nan)
        rows = [0] * self.num_exits
        t0 = time.perf_counter()
        if loaded["x"] is not None:
            ok = loaded["ok"]
            lab, cf, ex, trace = self.executor.run_early_exit(loaded["x"], thresholds, cap)
            labels[ok], conf[ok], exits[ok], costs[ok] = lab, cf, ex + 1, self.exit_costs[ex]
            rows = trace.rows_per_stage + [0] * (self.num_exits - len(trace.rows_per_stage))
            if stage_calls is not None:
                for k, (r, sec) in enumerate(zip(trace.rows_per_stage, trace.stage_seconds)):
                    stage_calls.add(k, r, sec)
        inference = time.perf_counter() - t0
        estimate = None
        if self.latency_profile is not None:
            estimate = float(self.latency_profile.batch_seconds(rows))
        return Predictions(
            paths=loaded["names"],
            label_array=labels,
            confidence_array=conf,
            exit_array=exits,
            cost_array=costs,
            error_list=loaded["errors"],
            true_label_array=loaded["true"],
            classes=self.classes,
            num_exits=self.num_exits,
            cost_convention=self.cost_convention,
            budget=chosen.budget,
            policy=chosen,
            speed={"preprocess_s": loaded["seconds"], "inference_s": inference},
            rows_per_stage=rows,
            estimated_seconds=estimate,
        )

    def _answered(self, part: Answered, chosen: ExitPolicy, preprocess: float, inference: float) -> Predictions:
        """A part released by the refilling scheduler as `Predictions` (exit -1 there: an error row)."""
        loaded, rows = part.payload, part.rows
        ran = part.exits >= 0
        costs = np.full(rows.size, math.nan)
        costs[ran] = self.exit_costs[part.exits[ran]]
        names, errors = loaded["names"], loaded["errors"]
        return Predictions(
            paths=[names[i] for i in rows],
            label_array=np.where(ran, part.labels, -1),
            confidence_array=np.where(ran, part.confidence, 0).astype(np.float32),
            exit_array=np.where(ran, part.exits + 1, 0),
            cost_array=costs,
            error_list=[errors[i] for i in rows],
            true_label_array=loaded["true"][rows],
            classes=self.classes,
            num_exits=self.num_exits,
            cost_convention=self.cost_convention,
            budget=chosen.budget,
            policy=chosen,
            speed={"preprocess_s": preprocess, "inference_s": inference},
            rows_per_stage=[int((part.exits >= k).sum()) for k in range(self.num_exits)],
            # Refilled stages run full batches: each image costs its exit's full-batch time.
            estimated_seconds=float(costs[ran].sum()) if self.latency_profile is not None else None,
        )

    def run_all_exits(self, inputs: Any, batch_size: int = 64) -> np.ndarray:
        """Logits of every exit for every input, (K, N, C), computing all stages (no early exit)."""
        out = []
        for chunk in _chunks(iter_input_items(inputs, self.classes), batch_size):
            arrays = [self.preprocessor.to_array(it.source, it.name or "<input>") for it in chunk]
            out.append(self.executor.run_all(self.preprocessor.normalise(np.stack(arrays))))
        if not out:
            raise ConfigError("run_all_exits() got no inputs")
        return np.concatenate(out, axis=1)


def _choose_scheduler(scheduler: str, strict: bool, inputs: Any, batch_size: int, on_gpu: bool = False) -> str:
    """ "refill" or "batch". auto refills streams on a GPU only: on CPU (benchmarks/results/runtime_speed.md)
    refilling was no faster, since a stage's time per row hardly changes above a few rows, and its queue work
    costs about what fuller calls save (realised / ideal 0.93-0.95 against 0.93-0.99 per batch on msdnet-tiny,
    batch 64, one thread); strict (a per-batch cap) and inputs of
    one batch at most run per batch."""
    if scheduler not in SCHEDULER_CHOICES:
        raise ConfigError(f"scheduler={scheduler!r} is unknown; use one of {', '.join(SCHEDULER_CHOICES)}")
    if strict:
        if scheduler == "refill":
            raise ConfigError(
                "strict=True caps each batch's cost, which the refilling scheduler cannot keep (it mixes rows "
                "of many batches in a stage call); use scheduler='batch' or 'auto' with strict"
            )
        return "batch"
    if scheduler != "auto":
        return scheduler
    return "refill" if on_gpu and not _at_most_one_batch(inputs, batch_size) else "batch"


def _at_most_one_batch(inputs: Any, batch_size: int) -> bool:
    """True for one image or array, or a sized collection of at most batch_size items (cheap checks only)."""
    from PIL import Image

    if isinstance(inputs, (Image.Image, InputItem, bytes, bytearray, memoryview)) or is_binary_file(inputs):
        return True
    if isinstance(inputs, np.ndarray):
        return inputs.ndim < 4 or inputs.shape[0] <= batch_size
    if isinstance(inputs, (str, os.PathLike)):
        return is_one_path(inputs)
    if isinstance(inputs, (list, tuple)):
        return len(inputs) <= batch_size and all(is_one_path(i) for i in inputs if isinstance(i, (str, os.PathLike)))
    return False


def _chunks(it: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Lists of `size` items (the last one shorter). When `it` raises, the items it gave before the error
    come first, as a shorter list, and then the error."""
    while True:
        chunk: list[Any] = []
        try:
            for item in itertools.islice(it, size):
                chunk.append(item)
        except Exception:
            if chunk:
                yield chunk
            raise
        if not chunk:
            return
        yield chunk


def load(
    bundle: str | os.PathLike | None = None,
    providers: Sequence[Any] | str | None = None,
    device: str = "auto",
    threads: int | None = None,
    verify: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    profile: ProfileLike | None = None,
    cost_mode: str = "auto",
    io_binding: bool | str = "auto",
    thread_pool: str = "session",
) -> AnytimeModel:
    """Load a bundle (the embedded default when None) on onnxruntime.

    `providers`: explicit onnxruntime providers; else `device` ("auto" | "cpu" | "cuda"): CUDA when
    onnxruntime-gpu and a GPU are present. `threads`: intra-op threads (None: onnxruntime's default).
    `verify`: check every file's sha256 against the manifest. `max_pixels`: larger input images are refused (an
    error row) as possible decompression bombs. `workers`: threads decoding image files (default: up to 4).
    `io_binding`: keep the stages' state
    tensors on the device between stages, only logits coming to the host ("auto": with CUDA; True also
    works on CPU; an unsupported provider with True is an error). `thread_pool`: "session" (default), a pool
    of `threads` per stage session, whose workers block between calls; "shared", one onnxruntime intra-op pool
    of `threads` for every session in this process, whose workers spin, which runs the small batches early
    exit leaves much faster at 2 threads and more (measured on msdnet-tiny: `benchmarks/results/runtime_speed.md`).
    The shared pool is process-wide and onnxruntime makes it once: after it, every onnxruntime session of the
    process, anytime's and any other, must use it (sessions made with default options fail), which is why a
    library call does not make it unasked. `anytime serve`, `profile` and `eval` do.
    `profile`: a latency profile (`LatencyProfile` or the JSON `anytime profile` writes) makes time the cost
    convention: budgets in seconds per image (`0.3ms`, `300us`; `40%` of the full network's measured time).
    `cost_mode`: how a policy's time is counted with a profile: "full-batches" (every stage runs full
    batches, as a refilling stage scheduler does, plus that scheduler's own work where the profile measured
    it) or "per-batch" (each batch compacted stage by stage; a strict prediction always fits its policy this
    way); "auto" (default): as a stream runs by default, full batches on a GPU, per batch on CPU. `predict`
    and `serve` price a budget as the executor they run on whatever this says; it decides for `calibrate`
    and `eval`.

    Threads: one model may serve several threads at once, as an onnxruntime session may. `predict` and
    `predict_batches` keep their batches, queues and decode threads per call and borrow the row buffers one
    call at a time, so every call answers as it would alone; fitted policies are cached and shared. Call
    `use_profile` (which changes the costs of every caller) before the threads start, not among them.
    """
    b = read_bundle(bundle, verify=verify)
    executor = StageExecutor(
        b, providers=providers, device=device, threads=threads, io_binding=io_binding, thread_pool=thread_pool
    )
    return AnytimeModel(b, executor, max_pixels=max_pixels, workers=workers, profile=profile, cost_mode=cost_mode)


__all__ = ["AnytimeModel", "load"]
