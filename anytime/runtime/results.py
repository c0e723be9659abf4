"""Prediction results: per-input rows (label, class, confidence, exit, cost, error) and batch totals."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import operator
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from anytime.errors import ConfigError, require
from anytime.fileio import atomic_output

ROW_KEYS = ("path", "label", "class", "confidence", "exit", "cost", "error")
# A run whose average cost exceeds its budget by more than this share says so (and suggests strict mode):
# calibration fits the budget on the validation data, and inputs unlike it exit later.
OVERSHOOT_MARGIN = 0.10


@dataclass
class Prediction:
    """One input's answer. `exit` is 1-based; `cost` is the cumulative cost of that exit per image."""

    path: str | None
    label: int | None
    class_name: str | None
    confidence: float | None
    exit: int | None
    cost: float | None
    error: str | None = None
    true_label: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_row(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "label": self.label,
            "class": self.class_name,
            "confidence": None if self.confidence is None else round(float(self.confidence), 6),
            "exit": self.exit,
            "cost": self.cost,
            "error": self.error,
        }


@dataclass
class Predictions:
    """Answers for a sequence of inputs, in input order, with totals over the successful ones.

    Stored as columns (numpy arrays) so that large runs cost no Python object per image; indexing gives
    a `Prediction`. Failed inputs have label -1, exit 0 and an error message.
    """

    paths: list[str | None]
    label_array: np.ndarray  # int64, -1 for failed inputs
    confidence_array: np.ndarray  # float32
    exit_array: np.ndarray  # int64, 1-based, 0 for failed inputs
    cost_array: np.ndarray  # float64, nan for failed inputs
    error_list: list[str | None]
    true_label_array: np.ndarray  # int64, -1 when unknown
    classes: Sequence[str]
    num_exits: int
    cost_convention: str
    budget: float | None = None  # average cost per image asked for (None with a fixed exit)
    policy: Any = None  # the ExitPolicy used
    seconds: float = 0.0  # wall time of the whole call
    speed: dict[str, float] = field(default_factory=dict)  # ms per image: preprocess, inference, total
    rows_per_stage: list[int] = field(default_factory=list)  # samples that ran each stage
    # With a latency profile: its estimate of this part's inference time priced as the part ran (the
    # per-batch executor: every stage call at the rows it ran; refill: full batches). A row's `cost` is its
    # exit's time at full batches, which leaves out what thinned-out calls cost.
    estimated_seconds: float | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @overload
    def __getitem__(self, i: int) -> Prediction: ...

    @overload
    def __getitem__(self, i: slice) -> "Predictions": ...

    def __getitem__(self, i: int | slice) -> "Prediction | Predictions":
        if isinstance(i, slice):
            return self._subset(i)
        i = operator.index(i)
        if self.error_list[i] is not None:
            return Prediction(
                self.paths[i],
                None,
                None,
                None,
                None,
                None,
                self.error_list[i],
                None if self.true_label_array[i] < 0 else int(self.true_label_array[i]),
            )
        label = int(self.label_array[i])
        return Prediction(
            path=self.paths[i],
            label=label,
            class_name=self.classes[label],
            confidence=float(self.confidence_array[i]),
            exit=int(self.exit_array[i]),
            cost=float(self.cost_array[i]),
            error=None,
            true_label=None if self.true_label_array[i] < 0 else int(self.true_label_array[i]),
        )

    def _subset(self, rows: slice) -> "Predictions":
        """The rows of a slice, as `Predictions` of the same run (its timing and stage counts are the whole
        run's, so they are not carried over; a latency profile's estimate is kept only for the whole run)."""
        whole = range(len(self))[rows] == range(len(self))
        return Predictions(
            paths=self.paths[rows],
            label_array=self.label_array[rows],
            confidence_array=self.confidence_array[rows],
            exit_array=self.exit_array[rows],
            cost_array=self.cost_array[rows],
            error_list=self.error_list[rows],
            true_label_array=self.true_label_array[rows],
            classes=self.classes,
            num_exits=self.num_exits,
            cost_convention=self.cost_convention,
            budget=self.budget,
            policy=self.policy,
            seconds=self.seconds if whole else 0.0,
            speed=dict(self.speed) if whole else {},
            rows_per_stage=list(self.rows_per_stage) if whole else [],
            estimated_seconds=self.estimated_seconds if whole else None,
        )

    # --- arrays over successful inputs ---------------------------------------------------------------
    @property
    def ok_mask(self) -> np.ndarray:
        return self.exit_array > 0

    @property
    def labels(self) -> np.ndarray:
        return self.label_array[self.ok_mask]

    @property
    def exits(self) -> np.ndarray:
        """1-based exits of the successful inputs."""
        return self.exit_array[self.ok_mask]

    @property
    def confidences(self) -> np.ndarray:
        return self.confidence_array[self.ok_mask]

    @property
    def costs(self) -> np.ndarray:
        return self.cost_array[self.ok_mask]

    @property
    def class_names(self) -> list[str]:
        return [self.classes[i] for i in self.labels]

    @property
    def errors(self) -> list[Prediction]:
        return [self[i] for i, e in enumerate(self.error_list) if e is not None]

    # --- totals -------------------------------------------------------------------------------------
    @property
    def images(self) -> int:
        return int(self.ok_mask.sum())

    @property
    def failed(self) -> int:
        return len(self) - self.images

    @property
    def average_cost(self) -> float:
        """Average cost per image; with a latency profile, its estimate of the time as the batches ran."""
        return RunningTotals.of(self).average_cost

    @property
    def exit_histogram(self) -> list[int]:
        """Number of successful inputs answered at each exit (index 0 = exit 1)."""
        return np.bincount(self.exits - 1, minlength=self.num_exits).tolist()

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.nan

    @property
    def labelled(self) -> int:
        return int((self.ok_mask & (self.true_label_array >= 0)).sum())

    @property
    def accuracy(self) -> float | None:
        """Accuracy over successful inputs with a known true label (class-named folders), else None."""
        known = self.ok_mask & (self.true_label_array >= 0)
        if not known.any():
            return None
        return float((self.label_array[known] == self.true_label_array[known]).mean())

    @property
    def over_budget(self) -> bool:
        """The average cost exceeds the budget by more than `OVERSHOOT_MARGIN` (see `summary`)."""
        return RunningTotals.of(self).over_budget

    def totals(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "failed": self.failed,
            "average_cost": self.average_cost,
            "budget": self.budget,
            "over_budget": self.over_budget,
            "cost_convention": self.cost_convention,
            "exit_histogram": self.exit_histogram,
            "images_per_second": self.images_per_second,
            "accuracy": self.accuracy,
            "speed_ms_per_image": dict(self.speed),
        }

    def summary(self) -> str:
        return RunningTotals.of(self).summary()

    def __repr__(self) -> str:
        return f"Predictions({self.images} ok, {self.failed} failed, average cost {self.average_cost:.4g} {self.cost_convention})"

    # --- export -------------------------------------------------------------------------------------
    def to_rows(self) -> list[dict[str, Any]]:
        return [p.to_row() for p in self]

    def save(self, path: str | os.PathLike) -> Path:
        """Write one row per input as JSONL (.jsonl/.json), CSV (.csv) or Parquet (.parquet), atomically."""
        path = Path(path)
        with row_file(path) as writer:
            writer.write(self.to_rows())
        return path

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[dict[str, Any]],
        *,
        classes: Sequence[str],
        num_exits: int,
        cost_convention: str,
        budget: float | None = None,
        true_labels: Sequence[int] | None = None,
    ) -> "Predictions":
        """The inverse of `to_rows` (rows that came back from elsewhere, e.g. Ray workers), with the
        true labels when known (-1: unknown)."""
        n = len(rows)
        failed = [r["error"] is not None for r in rows]
        return cls(
            paths=[r["path"] for r in rows],
            label_array=np.array([-1 if f else r["label"] for r, f in zip(rows, failed)], dtype=np.int64),
            confidence_array=np.array([0.0 if f else r["confidence"] for r, f in zip(rows, failed)], dtype=np.float32),
            exit_array=np.array([0 if f else r["exit"] for r, f in zip(rows, failed)], dtype=np.int64),
            cost_array=np.array([math.nan if f else r["cost"] for r, f in zip(rows, failed)], dtype=np.float64),
            error_list=[r["error"] for r in rows],
            true_label_array=np.full(n, -1, dtype=np.int64)
            if true_labels is None
            else np.asarray(true_labels, dtype=np.int64),
            classes=classes,
            num_exits=num_exits,
            cost_convention=cost_convention,
            budget=budget,
        )


@dataclass
class RunningTotals:
    """Totals accumulated batch by batch, so a stream of any length needs no per-image memory."""

    num_exits: int
    cost_convention: str
    budget: float | None = None
    images: int = 0
    failed: int = 0
    cost_sum: float = 0.0
    labelled: int = 0
    correct: int = 0
    seconds: float = 0.0
    inference_seconds: float = 0.0  # measured: running the stage graphs (decoding excluded)
    decode_seconds: float = 0.0  # measured: reading and decoding the inputs (in threads beside inference)
    exit_counts: np.ndarray | None = None
    estimated_seconds: float = 0.0  # the latency profile's estimate, as run (see Predictions)
    estimated_images: int = 0  # images the estimate covers (all of them, or it is not used)

    def __post_init__(self) -> None:
        if self.exit_counts is None:
            self.exit_counts = np.zeros(self.num_exits, dtype=np.int64)

    @classmethod
    def of(cls, preds: Predictions) -> "RunningTotals":
        t = cls(preds.num_exits, preds.cost_convention, preds.budget)
        t.add(preds)
        t.seconds = preds.seconds
        if "inference_s" not in preds.speed and "inference" in preds.speed:  # predict(): ms per image
            t.inference_seconds = preds.speed["inference"] * t.images / 1e3
            t.decode_seconds = preds.speed.get("preprocess", 0.0) * t.images / 1e3
        return t

    def add(self, preds: Predictions) -> None:
        ok = preds.ok_mask
        self.images += int(ok.sum())
        self.failed += int((~ok).sum())
        self.cost_sum += float(preds.cost_array[ok].sum())
        assert self.exit_counts is not None  # set by __post_init__
        self.exit_counts += np.bincount(preds.exit_array[ok] - 1, minlength=self.num_exits)
        known = ok & (preds.true_label_array >= 0)
        self.labelled += int(known.sum())
        self.correct += int((preds.label_array[known] == preds.true_label_array[known]).sum())
        self.inference_seconds += float(preds.speed.get("inference_s", 0.0))
        self.decode_seconds += float(preds.speed.get("preprocess_s", 0.0))
        if preds.estimated_seconds is not None:
            self.estimated_seconds += float(preds.estimated_seconds)
            self.estimated_images += int(ok.sum())

    @property
    def average_cost(self) -> float:
        if not self.images:
            return math.nan
        if self.estimated_images == self.images:
            return self.estimated_seconds / self.images
        return self.cost_sum / self.images

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def over_budget(self) -> bool:
        """The average cost exceeds the budget by more than `OVERSHOOT_MARGIN`."""
        return bool(self.budget and self.images and self.average_cost > self.budget * (1 + OVERSHOOT_MARGIN))

    def summary(self) -> str:
        from anytime.runtime.budget import TIME_CONVENTION, format_cost

        head = f"{self.images} image(s) predicted" + (f", {self.failed} failed" if self.failed else "")
        if self.seconds > 0:
            head += f" in {self.seconds:.2f} s ({self.images / self.seconds:.1f} images/s)"
        lines = [head]
        if self.images:
            timed = self.cost_convention == TIME_CONVENTION
            what = "average time (latency profile estimate, as the batches ran)" if timed else "average cost"
            cost = f"{what} {format_cost(self.average_cost, self.cost_convention)} per image"
            if self.budget is not None:
                cost += (
                    f" against a budget of {format_cost(self.budget, self.cost_convention)}"
                    f" ({100 * self.average_cost / self.budget:.1f}% of it)"
                )
            lines.append(cost)
            if timed and self.inference_seconds > 0:
                measured = self.inference_seconds / self.images
                line = f"measured inference time {format_cost(measured, TIME_CONVENTION)} per image"
                if self.budget is not None:
                    line += f" ({100 * measured / self.budget:.1f}% of the budget)"
                decode = self.decode_seconds / self.images
                if decode > 0.1 * measured:
                    # Decoding threads share the cores (and the GIL) with inference, which the profile
                    # measured alone: say so, or a budget looks missed that the stages met.
                    line += (
                        f", with decoding the inputs ({format_cost(decode, TIME_CONVENTION)} per image) running in "
                        "other threads at the same time; the latency profile timed the stages alone"
                    )
                lines.append(line)
            if self.over_budget:
                assert self.budget is not None  # over_budget needs one
                lines.append(
                    f"WARNING: the average {'time' if timed else 'cost'} is {100 * self.average_cost / self.budget:.0f}% "
                    f"of the budget, more than {100 * OVERSHOOT_MARGIN:.0f}% over: these inputs exit later than the "
                    "calibration data did (are they like it?); use --strict (strict=True) to cap every batch at the budget"
                )
            assert self.exit_counts is not None  # set by __post_init__
            lines.append(
                "exits: "
                + "  ".join(
                    f"{i + 1}: {c} ({100 * c / self.images:.1f}%)" for i, c in enumerate(self.exit_counts.tolist())
                )
            )
        if self.labelled:
            lines.append(
                f"accuracy {100 * self.correct / self.labelled:.2f}% on {self.labelled} image(s) in class-named folders"
            )
        return "\n".join(lines)


def output_format(path: str | os.PathLike) -> str:
    """jsonl, csv or parquet, from the file name; Parquet needs pyarrow (a one-line error naming the extra)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        require("pyarrow", "parquet", f"Writing {path}")
        return "parquet"
    raise ConfigError(f"cannot tell the output format of '{path}': use a .jsonl, .csv or .parquet file name")


def row_arrow_schema() -> Any:
    """The rows as an Arrow schema (Parquet output, Ray datasets): nulls where a row has None."""
    import pyarrow as pa

    return pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.int64()),
            ("class", pa.string()),
            ("confidence", pa.float64()),
            ("exit", pa.int64()),
            ("cost", pa.float64()),
            ("error", pa.string()),
        ]
    )


@contextlib.contextmanager
def row_file(path: str | os.PathLike) -> Iterator["RowWriter | ParquetRowWriter"]:
    """A writer of prediction rows to `path` (format from its suffix) that appears there atomically,
    complete, only when the block ends without an error."""
    fmt = output_format(path)
    if fmt == "parquet":
        with atomic_output(path, "wb") as fh:
            parquet = ParquetRowWriter(fh)
            yield parquet
            parquet.close()
    else:
        with atomic_output(path, "w", encoding="utf-8", newline="") as fh:
            yield RowWriter(fh, fmt)


class RowWriter:
    """Writes prediction rows to an open text stream as JSONL or CSV (header first), flushing per call."""

    def __init__(self, stream: Any, fmt: str) -> None:
        self.stream = stream
        self.fmt = fmt
        self._csv = None
        if fmt == "csv":
            self._csv = csv.DictWriter(stream, fieldnames=list(ROW_KEYS), lineterminator="\n")
            self._csv.writeheader()

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        if self._csv is not None:
            for row in rows:
                self._csv.writerow({k: ("" if row[k] is None else row[k]) for k in ROW_KEYS})
        else:
            for row in rows:
                self.stream.write(json.dumps({k: row[k] for k in ROW_KEYS}, ensure_ascii=False) + "\n")
        self.stream.flush()


class ParquetRowWriter:
    """Writes prediction rows to an open binary stream as Parquet, one row group per `rows_per_group`
    rows (a row group per small batch would make the file slow to read); `close` writes the footer."""

    def __init__(self, stream: Any, rows_per_group: int = 65536) -> None:
        import pyarrow.parquet as pq

        self.schema = row_arrow_schema()
        self.rows_per_group = int(rows_per_group)
        self._writer = pq.ParquetWriter(stream, self.schema)
        self._pending: list[dict[str, Any]] = []

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        self._pending.extend(rows)
        if len(self._pending) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            import pyarrow as pa

            self._writer.write_table(pa.Table.from_pylist(self._pending, schema=self.schema))
            self._pending = []

    def close(self) -> None:
        self._flush()
        self._writer.close()


def concat(parts: Sequence[Predictions], **kw: Any) -> Predictions:
    """Join per-batch results of one model into one."""
    first = parts[0]
    rows = [0] * first.num_exits
    for p in parts:
        rows = [a + b for a, b in zip(rows, p.rows_per_stage or [0] * first.num_exits)]
    estimates = [p.estimated_seconds for p in parts]
    kw.setdefault("estimated_seconds", None if None in estimates else float(sum(e or 0.0 for e in estimates)))
    return Predictions(
        paths=[x for p in parts for x in p.paths],
        label_array=np.concatenate([p.label_array for p in parts]),
        confidence_array=np.concatenate([p.confidence_array for p in parts]),
        exit_array=np.concatenate([p.exit_array for p in parts]),
        cost_array=np.concatenate([p.cost_array for p in parts]),
        error_list=[x for p in parts for x in p.error_list],
        true_label_array=np.concatenate([p.true_label_array for p in parts]),
        classes=first.classes,
        num_exits=first.num_exits,
        cost_convention=first.cost_convention,
        budget=first.budget,
        policy=first.policy,
        rows_per_stage=rows,
        **kw,
    )
