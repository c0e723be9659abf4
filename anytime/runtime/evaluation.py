"""Evaluation of bundles on a labelled split: the anytime table and budget curves, as data.

Torch-free: every exit's logits come from the bundle on onnxruntime, images from `anytime.data`'s
numpy readers. A training run directory must be exported first (`anytime eval` does that for you,
into a temporary bundle); writing and plotting the results is `anytime.runtime.reports`. Thresholds are always fitted on the bundle's validation data (calibration.npz) and
measured on the chosen split. Applying thresholds to precomputed all-exit logits gives exactly what
real early exit gives (the runtime tests that equality), so one pass over the split serves every budget.

    report = evaluate("bundles/fm", "npz:fashion-mnist.npz", split="test")
    report.save("reports/fm")     # report.json, anytime.csv, budget_curve.csv, PNGs (with matplotlib)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anytime.errors import ConfigError, DatasetError
from anytime.formats.bundle import is_bundle_dir
from anytime.formats.rundir import is_model_dir
from anytime.runtime.calibration import ValidationData, first_exit, softmax_confidence

log = logging.getLogger(__name__)

CURVE_POLICIES = ("geometric", "search")
HISTOGRAM_FRACTIONS = (0.25, 0.5, 0.75)
CHUNK = 1024


@dataclass
class ExitRow:
    exit: int
    cost: float
    fraction: float
    params: int | None
    top1: float
    top5: float | None


@dataclass
class CurvePoint:
    policy: str
    budget: float
    budget_fraction: float
    cost: float  # realised average cost per image on the evaluated split
    accuracy: float
    val_cost: float
    val_accuracy: float
    exit_fractions: list[float]


@dataclass
class ModelReport:
    """One model's evaluation; `save` writes it, plots are redrawn from the saved numbers."""

    name: str
    bundle: str
    data: str
    split: str
    count: int
    cost_convention: str
    exits: list[ExitRow]
    curve: list[CurvePoint]
    seconds: float
    method: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def points(self, policy: str) -> list[CurvePoint]:
        return [p for p in self.curve if p.policy == policy]


@dataclass
class EvalReport:
    models: list[ModelReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"models": [m.to_dict() for m in self.models]}

    def save(self, directory: str | os.PathLike, plots: bool = True) -> list[Path]:
        """Write CSV, JSON and (with matplotlib installed) PNG plots; see `anytime.runtime.reports`."""
        from anytime.runtime.reports import save_report

        return save_report(self, directory, plots=plots)


def _split_images(data: str, split: str):
    from anytime.data import open_dataset

    ds = open_dataset(data)
    images = getattr(ds, split, None) if split in ("train", "val", "test") else None
    if images is None:
        available = [s for s in ("train", "val", "test") if getattr(ds, s, None) is not None]
        raise DatasetError(f"{data}: has no '{split}' split; choose --split from {', '.join(available)}")
    if len(images) == 0:
        others = [s for s in ("train", "val", "test") if s != split and len(getattr(ds, s, None) or ()) > 0]
        raise DatasetError(
            f"the '{split}' split of {data} has no images; add some"
            + (f" or choose --split from {', '.join(others)}" if others else "")
        )
    return ds, images


def all_exit_logits(model: Any, images: Any, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(K, N, C) logits of every exit and (N,) labels, streaming the split in chunks."""
    from tqdm import tqdm

    n = len(images)
    logits, labels = [], []
    bar = tqdm(total=n, desc="evaluating", unit="img", disable=not progress)
    for start in range(0, n, CHUNK):
        idx = np.arange(start, min(start + CHUNK, n))
        if getattr(images, "in_memory", False):
            batch, y = images.get_batch(idx)
        else:  # image folders: images of any size, preprocessed one by one before batching
            pairs = [images[int(i)] for i in idx]
            batch, y = [image for image, _ in pairs], [label for _, label in pairs]
        logits.append(model.run_all_exits(batch, batch_size=256))
        labels.append(np.asarray(y, dtype=np.int64))
        bar.update(len(idx))
    bar.close()
    return np.concatenate(logits, axis=1), np.concatenate(labels)


def budget_grid(exit_costs: np.ndarray, points: int, cheapest: float | None = None) -> np.ndarray:
    """Budgets from the first exit's cost (or `cheapest`, the cheapest policy's cost where that is more) to
    the full network, evenly spaced, plus the summary's fractions (25/50/75% of the full network) when they
    are feasible."""
    if points < 2:
        raise ConfigError(f"--points must be at least 2, got {points}")
    first, full = max(float(exit_costs[0]), cheapest or 0.0), float(exit_costs[-1])
    marks = [f * full for f in HISTOGRAM_FRACTIONS if f * full >= first]
    return np.unique(np.concatenate([np.linspace(first, full, points), marks]))


def check_bundle_dir(path: str | os.PathLike) -> Path:
    """`path` as a bundle directory; a run directory is refused (exporting it needs torch: the caller's job)."""
    p = Path(path).expanduser()
    if is_bundle_dir(p):
        return p
    if is_model_dir(p):
        raise ConfigError(
            f"'{path}' is a training run directory, not a bundle; export it first with "
            f"`anytime export {path} -o BUNDLE_DIR` (the `anytime eval` command does this for you)"
        )
    raise ConfigError(
        f"'{path}' is neither a bundle (no manifest.json) nor a run directory (no model.json); "
        "pass a directory written by `anytime export` or `anytime train`"
    )


def evaluate_model(
    path: str | os.PathLike,
    data: str,
    split: str = "test",
    points: int = 15,
    providers: Any = None,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = False,
    name: str | None = None,
    profile: Any = None,
    cost_mode: str = "auto",
    thread_pool: str = "session",
) -> ModelReport:
    """One bundle on one split. `name` labels it in tables and plots (default: the directory's name).
    `profile` (a latency profile of this bundle) puts costs and budgets in seconds per image."""
    from anytime.runtime.model import load

    t0 = time.perf_counter()
    label = name or Path(path).expanduser().resolve().name
    bundle_dir = check_bundle_dir(path)
    model = load(
        bundle_dir,
        providers=providers,
        device=device,
        threads=threads,
        thread_pool=thread_pool,
        profile=profile,
        cost_mode=cost_mode,
    )
    ds, images = _split_images(data, split)
    _check_class_count(ds, data, model.classes, bundle_dir)
    logits, labels = all_exit_logits(model, images, progress=progress)
    order = _model_labels(ds.info.classes, model.classes)
    if order is not None:
        labels = order[labels]
    confidence, predictions = softmax_confidence(logits)
    correct = predictions == labels[None, :]
    costs = model.exit_costs
    full = float(costs[-1])
    params = [s.params for s in model.bundle.stages]
    data_for_cost = model.validation_data()  # prices a policy on the split as calibration does (cost_mode)

    exits = []
    for k in range(model.num_exits):
        top5 = None
        if logits.shape[2] > 10:
            top = np.argpartition(-logits[k], 5, axis=1)[:, :5]
            top5 = float((top == labels[:, None]).any(axis=1).mean())
        exits.append(ExitRow(k + 1, float(costs[k]), float(costs[k]) / full, params[k], float(correct[k].mean()), top5))

    curve = []
    n = labels.shape[0]
    for budget in budget_grid(costs, points, model.cheapest_cost()):
        policies = model.calibrate_all(float(budget))
        for name in CURVE_POLICIES:
            policy = policies[name]
            chosen = first_exit(confidence, policy.threshold_array())
            fractions = np.bincount(chosen, minlength=model.num_exits) / n
            curve.append(
                CurvePoint(
                    policy=name,
                    budget=float(budget),
                    budget_fraction=float(budget) / full,
                    cost=_realised_cost(data_for_cost, costs, chosen),
                    accuracy=float(correct[chosen, np.arange(n)].mean()),
                    val_cost=policy.expected_cost,
                    val_accuracy=policy.expected_accuracy,
                    exit_fractions=[float(f) for f in fractions],
                )
            )
    provenance = model.bundle.manifest.get("provenance", {})
    return ModelReport(
        name=_model_name(label, provenance),
        bundle=str(bundle_dir),
        data=data,
        split=split,
        count=int(n),
        cost_convention=model.cost_convention,
        exits=exits,
        curve=curve,
        seconds=time.perf_counter() - t0,
        method=provenance.get("method"),
    )


def _check_class_count(ds: Any, data: str, classes: Sequence[str], bundle_dir: Path) -> None:
    if ds.info.num_classes != len(classes):
        raise DatasetError(
            f"{data} has {ds.info.num_classes} classes but the model {bundle_dir} has {len(classes)}; "
            "evaluate on the dataset the model was trained for"
        )


def _model_labels(data_classes: Sequence[str], model_classes: Sequence[str]) -> np.ndarray | None:
    """The model's index of each of the data set's classes, matched by name as serve matches class-named
    folders (an image folder lists its classes sorted by name, which need not be the model's order); None
    to take the data set's labels as they are (the same names in the same order, or names that do not
    match one for one, e.g. "0".."9" of an npz file without class names)."""
    from anytime.runtime.inputs import ClassFolders

    if list(data_classes) == list(model_classes):
        return None
    folders = ClassFolders(model_classes)
    order = np.asarray([folders.index(c) for c in data_classes], dtype=np.int64)
    if (order < 0).any() or len(set(order.tolist())) != len(order):
        return None
    return order


def _realised_cost(data: ValidationData, costs: np.ndarray, exits: np.ndarray) -> float:
    """Average cost per image of the exits taken on the split, counted as calibration counts it."""
    if data.linear:
        return float(costs[exits].mean())
    assert data.cost_model is not None  # not linear means a model was given
    return float(data.cost_model.reach_cost(data.reach_counts(exits), exits.size))


def _model_name(name: str, provenance: dict[str, Any]) -> str:
    method = provenance.get("method")
    return f"{name} ({method})" if method and method not in name else name


def evaluate(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    data: str,
    split: str = "test",
    points: int = 15,
    names: Sequence[str | None] | None = None,
    **kwargs: Any,
) -> EvalReport:
    """Evaluate one or several bundles on the same split; `kwargs` go to `evaluate_model` (device,
    providers, threads, thread_pool, progress, cost_mode). `names` label the models (default: their directories' names).
    `profile`: one latency profile (of a single bundle) or a list of them, one per bundle in order: a profile
    describes one bundle's graphs, so several bundles need one each."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    names = list(names) if names is not None else [None] * len(paths)
    if len(names) != len(paths):
        raise ConfigError(f"evaluate() got {len(paths)} bundles but {len(names)} names; give one name per bundle")
    profile = kwargs.pop("profile", None)
    if isinstance(profile, (list, tuple)):
        profiles = list(profile)
    else:
        profiles = [profile] * len(paths)
        if profile is not None and len(paths) > 1:
            profiles = []
    if len(profiles) != len(paths):
        raise ConfigError(
            f"{len(paths)} models but {len(profiles) if profiles else 'one'} latency profile(s): a profile is "
            "measured for one bundle, so give one per model, in the same order (--profile A.json --profile B.json)"
        )
    if len(paths) > 1:
        # Every model against the data before any is evaluated, so a mismatch in the last is not found last.
        from anytime.formats.bundle import read_bundle

        ds, _ = _split_images(data, split)
        for p in paths:
            bundle_dir = check_bundle_dir(p)
            _check_class_count(ds, data, read_bundle(bundle_dir).classes, bundle_dir)
    report = EvalReport(
        [
            evaluate_model(p, data, split, points, name=n, profile=prof, **kwargs)
            for p, n, prof in zip(paths, names, profiles)
        ]
    )
    names = [m.name for m in report.models]
    for i, m in enumerate(report.models):  # overlaid plots need distinct labels
        if names.count(m.name) > 1:
            m.name = f"{m.name} #{i + 1}"
    return report
