"""Budgeted batch prediction on a Ray cluster (`anytime serve --ray`, `predict_dataset`), on Ray Data.

The driver calibrates the exit policy once, from the bundle's validation data, and ships the thresholds
with the bundle's graphs (through Ray's object store, so workers need no shared filesystem for the bundle)
to a pool of actors. Each actor loads the bundle once and runs every batch of rows through the same
early-exit executor as the single-process path (`AnytimeModel.predict_batches` on one batch), so a row
is the same row whichever path computed it. Unreadable inputs become error rows there, as they do in one
process. An actor that dies is restarted and its batch is run again by Ray; a batch's rows only reach the
output once its task has finished, so a retry loses and duplicates nothing.

This is the only module that imports ray (an import-linter contract checks it), lazily through
`require_ray`, so everything else works without the `[ray]` extra.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from anytime.errors import ClusterError, ConfigError, require
from anytime.formats.bundle import read_bundle
from anytime.formats.pathlist import is_path_list, list_format, open_parquet, path_column, read_path_list
from anytime.runtime.budget import BudgetLike
from anytime.runtime.calibration import ExitPolicy
from anytime.runtime.engine import StageExecutor
from anytime.runtime.inputs import ClassFolders, InputItem, MissingInput, expand_paths
from anytime.runtime.model import AnytimeModel, PolicyLike, load
from anytime.runtime.results import Predictions, row_arrow_schema

PATH_COLUMN = "path"
IMAGE_COLUMN = "image"
ROWS_PER_BLOCK = 1024


def require_ray(purpose: str = "Prediction on a Ray cluster") -> Any:
    """The ray module (with Ray Data), or a one-line error naming the extra that installs it."""
    ray = require("ray", "ray", purpose)
    require("ray.data", "ray", purpose)
    return ray


def connect(address: str | None = "auto", quiet: bool = True) -> bool:
    """Join a Ray cluster; True when this call started Ray (then `ray.shutdown()` is the caller's).

    "auto" (or None): the cluster RAY_ADDRESS or `ray start` names, else a new local one on this machine;
    "local": always a new local one; anything else: a cluster address (`ray://host:10001`, `host:6379`).
    Already connected (ray.init called by the user): nothing is done.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    if address not in (None, "auto", "local"):
        check_reachable(address)
    elif address != "local" and os.environ.get("RAY_ADDRESS", "") not in ("", "auto", "local"):
        check_reachable(os.environ["RAY_ADDRESS"], source="RAY_ADDRESS=")
    try:
        ray.init(
            address=None if address in (None, "auto") else address,
            logging_level=logging.WARNING if quiet else logging.INFO,
            include_dashboard=False,
        )
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ClusterError(
            f"cannot start or join Ray ({address or 'auto'}): {lines[0] if lines else type(exc).__name__}"
        ) from exc
    return True


def check_reachable(address: str, timeout: float = 10.0, source: str = "") -> None:
    """A one-line ClusterError when nothing listens at a cluster address (`ray://host:port`, `host:port`):
    ray.init itself retries such an address for minutes. Addresses it cannot parse are left to Ray."""
    import socket

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ClusterError(
            f"no Ray cluster answers at {source}{address} ({reason}); check the address, or start the cluster there "
            "(ray start --head)"
        ) from exc


# ------------------------------------------------------------------------------------------- the actors
class BundleWorker:
    """One Ray actor: the bundle loaded once, the driver's thresholds, and `__call__` for a batch of rows."""

    def __init__(
        self,
        bundle_files: Any,
        policy: dict[str, Any],
        image_column: str,
        path_column: str | None,
        strict: bool,
        device: str | None,
        threads: int | None,
        max_pixels: int,
    ) -> None:
        ray = require_ray()
        files: dict[str, bytes] = ray.get(bundle_files) if isinstance(bundle_files, ray.ObjectRef) else bundle_files
        # The graphs are loaded into the onnxruntime sessions; the copy on disk is needed only while loading.
        directory = Path(tempfile.mkdtemp(prefix="anytime-bundle-"))
        try:
            for name, data in files.items():
                (directory / name).write_bytes(data)
            bundle = read_bundle(directory, calibration=False)
            executor = StageExecutor(bundle, device=device, threads=threads)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        self.model = AnytimeModel(bundle, executor, max_pixels=max_pixels, workers=1)
        self.policy = ExitPolicy.from_dict(policy)
        self.image_column = image_column
        self.path_column = path_column
        self.strict = strict

    def items(self, batch: dict[str, np.ndarray]) -> list[InputItem]:
        if self.image_column not in batch:
            raise ConfigError(f"the dataset has no column {self.image_column!r} (it has {sorted(batch)})")
        images = batch[self.image_column]
        names = batch.get(self.path_column) if self.path_column else None
        items = []
        for i in range(len(images)):
            source = images[i]
            if isinstance(source, np.str_):
                source = str(source)
            elif isinstance(source, np.bytes_):
                source = bytes(source)
            name = names[i] if names is not None else None
            if name is not None:
                name = str(name)
            elif isinstance(source, str):
                name = source
            items.append(InputItem(source, name))
        return items

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        """One batch of rows: one early-exit batch (so `strict` caps it), one output row per input row."""
        import pyarrow as pa

        items = self.items(batch)
        rows: list[dict[str, Any]] = []
        if items:
            for part in self.model.predict_batches(
                items, policy=self.policy, batch_size=len(items), strict=self.strict, on_error="record"
            ):
                rows += part.to_rows()
        return pa.Table.from_pylist(rows, schema=row_arrow_schema())


def bundle_files(model: AnytimeModel) -> dict[str, bytes]:
    """What a worker needs to run the bundle: its manifest and stage graphs, as bytes."""
    return {name: model.bundle.file(name).read_bytes() for name in model.bundle.serving_files()}


def default_workers() -> int:
    ray = require_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def map_predictions(
    ds: Any,
    model: AnytimeModel,
    policy: ExitPolicy,
    *,
    image_column: str,
    path_column: str | None = PATH_COLUMN,
    strict: bool = False,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | None = "cpu",
    threads: int | None = 1,
    worker_class: type = BundleWorker,
) -> Any:
    """`ds` mapped to prediction rows by `workers` actors (one CPU each) with `policy`'s thresholds.

    `worker_class`: BundleWorker or a subclass (the tests kill one mid-job this way)."""
    ray = require_ray()
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ConfigError(f"workers={workers} must be at least 1")
    files = ray.put(bundle_files(model))
    return ds.map_batches(
        worker_class,
        fn_constructor_kwargs={
            "bundle_files": files,
            "policy": policy.to_dict(),
            "image_column": image_column,
            "path_column": path_column,
            "strict": bool(strict),
            "device": device,
            "threads": threads,
            "max_pixels": model.preprocessor.max_pixels,
        },
        batch_size=int(batch_size),
        batch_format="numpy",
        concurrency=workers,
        num_cpus=1,
        # Ray Data restarts a dead actor and re-runs its batch without limit (max_restarts and
        # max_task_retries of -1 are its defaults for actor pools), which is what a lost worker needs.
    )


# ------------------------------------------------------------------------------------------ the Python API
def predict_dataset(
    ds: Any,
    bundle: str | os.PathLike | AnytimeModel | None = None,
    budget: BudgetLike | None = None,
    policy: PolicyLike | None = "best",
    exit: int | None = None,
    *,
    image_column: str | None = None,
    path_column: str | None = PATH_COLUMN,
    strict: bool = False,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | None = "cpu",
    threads: int | None = 1,
) -> Any:
    """Budgeted early-exit prediction over a Ray Dataset; returns a Ray Dataset of prediction rows.

    `ds`: a column of encoded image bytes, of paths (readable on the workers) or of uint8 H×W×C arrays
    (`image_column`; default "image" when the dataset has it, else "path"), and optionally the rows'
    names (`path_column`). The result has the columns path, label, class, confidence, exit, cost, error
    (null label/class/confidence/exit/cost on an error row), one row per input row.
    `bundle`: a bundle directory, a loaded `AnytimeModel`, or None for the embedded default. The policy
    (`budget`, `policy`, `exit`, as in `AnytimeModel.predict`) is calibrated here, once, and every worker
    uses these thresholds. `strict`: no batch of `batch_size` rows costs more than rows × budget.
    `workers`: actors of one CPU each (default: the cluster's CPUs less one); `device`/`threads`: their
    onnxruntime. The actors hold their CPUs for the whole job, and the operations before this one (reads,
    repartitions) need a CPU left over or they wait forever: hence the default; with `workers` equal to the
    cluster's CPUs, `materialize()` the input first.
    """
    require_ray()
    if workers is None:
        workers = max(1, default_workers() - 1)
    model = bundle if isinstance(bundle, AnytimeModel) else load(bundle, device="cpu", threads=1)
    chosen = model.resolve_policy(budget=budget, policy=policy, exit=exit)
    if strict and chosen.budget is None:
        raise ConfigError("strict caps a budget; it has no meaning with a fixed exit")
    columns = ds.columns()  # None where the schema is not known without running the dataset
    if image_column is None:
        image_column = IMAGE_COLUMN if columns is not None and IMAGE_COLUMN in columns else PATH_COLUMN
    if columns is not None and image_column not in columns:
        # Checked here: inside the workers it would surface as a failed task, far from the cause.
        raise ConfigError(
            f"the dataset has no column {image_column!r} (its columns: {', '.join(columns)}); name the column of "
            "encoded image bytes, paths or uint8 arrays with image_column="
        )
    return map_predictions(
        ds,
        model,
        chosen,
        image_column=image_column,
        path_column=path_column,
        strict=strict,
        batch_size=batch_size,
        workers=workers,
        device=device,
        threads=threads,
    )


# ------------------------------------------------------------------------------------------- the CLI path
def blocks_for(rows: int, batch_size: int, workers: int) -> int:
    """Blocks to split `rows` listed paths into: about ROWS_PER_BLOCK rows each (a block is a unit of
    scheduling, retry and output), but enough for every worker to have two, and never under a batch."""
    return max(1, min(math.ceil(rows / batch_size), max(math.ceil(rows / ROWS_PER_BLOCK), 2 * workers)))


def rows_per_block(rows: int, batch_size: int, workers: int) -> int:
    """Rows of each block (the last may hold fewer) when `rows` rows are cut into `blocks_for` blocks: whole
    batches, since a worker's batch never spans two blocks, so that its batches are those of one process (what
    --strict caps)."""
    batches = math.ceil(max(rows, 1) / batch_size)
    return math.ceil(batches / blocks_for(rows, batch_size, workers)) * batch_size


def dataset_of_inputs(
    inputs: Sequence[str], stdin: TextIO | None = None, batch_size: int = 64, workers: int = 1
) -> tuple[Any, list[tuple[int, MissingInput]], int]:
    """The inputs of `anytime serve` as a Ray Dataset with a `path` column (None when there are none),
    the arguments that matched nothing, each with the number of the dataset's rows before it (its place
    among the output rows), and the number of rows.

    A Parquet path list is read by Ray Data (in parallel, never through the driver), before the prediction
    starts; files, folders, globs, stdin and JSONL lists are expanded here. The parts keep the order of the arguments.
    """
    ray = require_ray()
    parts: list[Any] = []
    missing: list[tuple[int, MissingInput]] = []
    pending: list[str] = []

    rows = 0

    def flush() -> None:
        nonlocal rows
        rows += len(pending)
        if pending:
            import pyarrow as pa

            per = rows_per_block(len(pending), batch_size, workers)
            tables = [pa.table({PATH_COLUMN: pending[i : i + per]}) for i in range(0, len(pending), per)]
            parts.append(ray.data.from_arrow(tables))  # a block per table
            pending.clear()

    for arg in inputs:
        if arg != "-" and is_path_list(arg) and list_format(arg) == "parquet":
            flush()
            reader = open_parquet(arg)
            column = path_column(reader.schema_arrow.names, arg)
            listed = reader.metadata.num_rows
            rows += listed
            # Read and split (in parallel, into the object store) before the actors start: Ray Data's file
            # listing, reading and repartitioning take a CPU each, which a pool of as many actors as the
            # cluster has CPUs would hold for good (measured: the job never started). A column of paths is
            # small next to the images.
            per = rows_per_block(listed, batch_size, workers)
            part = (
                ray.data.read_parquet(arg, columns=[column])
                .repartition(target_num_rows_per_block=per, strict=True)
                .materialize()
            )
            parts.append(part if column == PATH_COLUMN else part.rename_columns({column: PATH_COLUMN}))
            continue
        if arg != "-" and is_path_list(arg):
            pending.extend(read_path_list(arg))
            continue
        for item in expand_paths([arg], stdin=stdin):
            if isinstance(item, MissingInput):
                missing.append((rows + len(pending), item))
            else:
                pending.append(str(item))
    flush()
    if not parts:
        return None, missing, 0
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), missing, rows


def stream_predictions(
    model: AnytimeModel,
    policy: ExitPolicy,
    inputs: Sequence[str],
    *,
    stdin: TextIO | None = None,
    strict: bool = False,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | None = "cpu",
    threads: int | None = 1,
    worker_class: type | None = None,
) -> Iterator[Predictions]:
    """`anytime serve --ray`: the predictions of the inputs, in input order, a block at a time, with the
    true labels of files in class-named folders (as `AnytimeModel.predict_batches` yields them)."""
    ray = require_ray()
    # Set before any dataset is made: a dataset keeps the context it was made under.
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows in input order, as in one process
    # The command draws its own progress bar; Ray Data's would log a status block every few seconds
    # when stderr is not a terminal. Its errors still show.
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    workers = default_workers() if workers is None else int(workers)
    ds, missing, rows = dataset_of_inputs(
        inputs, stdin=stdin if stdin is not None else sys.stdin, batch_size=batch_size, workers=workers
    )
    # No more actors than batches: the others would only start up (and Ray warns about them).
    workers = max(1, min(workers, math.ceil(rows / batch_size)))
    common: dict[str, Any] = {
        "classes": model.classes,
        "num_exits": model.num_exits,
        "cost_convention": model.cost_convention,
        "budget": policy.budget,
    }
    empty = {"label": None, "class": None, "confidence": None, "exit": None, "cost": None}
    # The error rows of arguments that matched nothing, to go in where the argument was (as in one process).
    waiting = collections.deque((at, {"path": m.name, **empty, "error": m.reason}) for at, m in missing)

    def left_waiting() -> Predictions:  # the arguments after the last row
        rows_out = [row for _, row in waiting]
        return Predictions.from_rows(rows_out, true_labels=[-1] * len(rows_out), **common)

    if ds is None:
        if waiting:
            yield left_waiting()
        return
    out = map_predictions(
        ds,
        model,
        policy,
        image_column=PATH_COLUMN,
        path_column=PATH_COLUMN,
        strict=strict,
        batch_size=batch_size,
        workers=workers,
        device=device,
        threads=threads,
        worker_class=worker_class or BundleWorker,
    )
    folders = ClassFolders(model.classes)
    done = 0  # the dataset's rows so far

    def merged(answered: list[dict[str, Any]]) -> Predictions:
        nonlocal done
        out_rows, true = [], []
        for row in answered:
            while waiting and waiting[0][0] <= done:
                out_rows.append(waiting.popleft()[1])
                true.append(-1)
            out_rows.append(row)
            true.append(folders.label(row["path"]) if row["path"] is not None else -1)
            done += 1
        return Predictions.from_rows(out_rows, true_labels=true, **common)

    try:
        for table in out.iter_batches(batch_format="pyarrow", batch_size=None):
            yield merged(table.to_pylist())
        if waiting:
            yield left_waiting()
    except ray.exceptions.RayError as exc:
        # Ray's message carries the worker's traceback; its last line names the error itself.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        cause = lines[-1] if lines else type(exc).__name__
        raise ClusterError(f"the Ray job failed: {cause} (Ray's log has the worker's traceback)") from exc


def timed_connect(address: str | None, quiet: bool) -> tuple[bool, float]:
    """`connect`, and the seconds it took (Ray's start-up cost, which the summary reports)."""
    t0 = time.perf_counter()
    started = connect(address, quiet=quiet)
    return started, time.perf_counter() - t0


def describe_cluster() -> str:
    ray = require_ray()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return f"{len(nodes)} node(s), {cpus} CPU(s)"


def shutdown() -> None:
    require_ray().shutdown()


__all__ = ["BundleWorker", "connect", "map_predictions", "predict_dataset", "require_ray", "stream_predictions"]
