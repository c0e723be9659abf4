"""`anytime eval`: the anytime table and budget curves of one or more bundles on a labelled split.

Torch-free: every exit's logits come from the bundle on onnxruntime, images from `anytime.data`'s
numpy readers. Thresholds are always fitted on the bundle's validation data (calibration.npz) and
measured on the chosen split. Applying thresholds to precomputed all-exit logits gives exactly what
real early exit gives (the runtime tests that equality), so one pass over the split serves every budget.

    report = evaluate("bundles/fm", "npz:fashion-mnist.npz", split="test")
    report.save("reports/fm")     # anytime.csv, budget_curve.csv, exit_histogram.csv, report.json, PNGs
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anytime.errors import ConfigError, DatasetError
from anytime.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from anytime.runtime.budget import format_cost
from anytime.runtime.bundle import is_bundle_dir
from anytime.runtime.calibration import first_exit, softmax_confidence

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
        """Write CSV, JSON and (with matplotlib installed) PNG plots; returns the files written."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "report.json", out / "anytime.csv", out / "budget_curve.csv"]
        atomic_write_json(written[0], self.to_dict())
        atomic_write_text(
            written[1],
            _csv(
                ["model", "exit", "cost", "cost_convention", "fraction", "params", "top1", "top5"],
                [[m.name, e.exit, e.cost, m.cost_convention, e.fraction, e.params, e.top1, e.top5] for m in self.models for e in m.exits],
            ),
        )
        atomic_write_text(
            written[2],
            _csv(
                ["model", "policy", "budget", "budget_fraction", "cost", "accuracy", "val_cost", "val_accuracy", "exit_fractions"],
                [
                    [m.name, p.policy, p.budget, p.budget_fraction, p.cost, p.accuracy, p.val_cost, p.val_accuracy,
                     " ".join(f"{f:.4f}" for f in p.exit_fractions)]
                    for m in self.models for p in m.curve
                ],
            ),
        )
        if plots:
            written += plot_report(self, out)
        return written


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return buf.getvalue()


def resolve_bundle(path: str | os.PathLike, force_export: bool = False) -> Path:
    """A bundle directory, or a run directory exported once into RUN_DIR/bundle (needs torch)."""
    p = Path(path).expanduser()
    if is_bundle_dir(p):
        return p
    if (p / "model.json").is_file():
        bundle = p / "bundle"
        if force_export or not is_bundle_dir(bundle):
            from anytime.export import export_bundle  # torch only for run directories

            log.info("exporting run %s to %s", p, bundle)
            export_bundle(p, bundle, force=True)
        return bundle
    raise ConfigError(
        f"'{path}' is neither a bundle (no manifest.json) nor a run directory (no model.json); "
        "pass a directory written by `anytime export` or `anytime train`"
    )


def _split_images(data: str, split: str):
    from anytime.data import open_dataset

    ds = open_dataset(data)
    images = getattr(ds, split, None) if split in ("train", "val", "test") else None
    if images is None:
        available = [s for s in ("train", "val", "test") if getattr(ds, s, None) is not None]
        raise DatasetError(f"{data}: has no '{split}' split; choose --split from {', '.join(available)}")
    return ds, images


def all_exit_logits(model: Any, images: Any, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(K, N, C) logits of every exit and (N,) labels, streaming the split in chunks."""
    from tqdm import tqdm

    n = len(images)
    logits, labels = [], []
    bar = tqdm(total=n, desc="evaluating", unit="img", disable=not progress)
    for start in range(0, n, CHUNK):
        idx = np.arange(start, min(start + CHUNK, n))
        batch, y = images.get_batch(idx)
        logits.append(model.run_all_exits(batch, batch_size=256))
        labels.append(np.asarray(y, dtype=np.int64))
        bar.update(len(idx))
    bar.close()
    return np.concatenate(logits, axis=1), np.concatenate(labels)


def budget_grid(exit_costs: np.ndarray, points: int) -> np.ndarray:
    """Budgets from the first exit's cost to the full network, evenly spaced, plus the summary's
    fractions (25/50/75% of the full network) when they are feasible."""
    if points < 2:
        raise ConfigError(f"--points must be at least 2, got {points}")
    first, full = float(exit_costs[0]), float(exit_costs[-1])
    marks = [f * full for f in HISTOGRAM_FRACTIONS if f * full >= first]
    return np.unique(np.concatenate([np.linspace(first, full, points), marks]))


def evaluate_model(
    path: str | os.PathLike,
    data: str,
    split: str = "test",
    points: int = 15,
    providers: Any = None,
    device: str | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> ModelReport:
    from anytime.runtime.model import load

    t0 = time.perf_counter()
    bundle_dir = resolve_bundle(path)
    model = load(bundle_dir, providers=providers, device=device, threads=threads)
    ds, images = _split_images(data, split)
    if ds.info.num_classes != len(model.classes):
        raise DatasetError(
            f"{data} has {ds.info.num_classes} classes but the model {bundle_dir} has {len(model.classes)}; "
            "evaluate on the dataset the model was trained for"
        )
    logits, labels = all_exit_logits(model, images, progress=progress)
    confidence, predictions = softmax_confidence(logits)
    correct = predictions == labels[None, :]
    costs = model.exit_costs
    full = float(costs[-1])
    params = [s.params for s in model.bundle.stages]

    exits = []
    for k in range(model.num_exits):
        top5 = None
        if logits.shape[2] > 10:
            top = np.argpartition(-logits[k], 5, axis=1)[:, :5]
            top5 = float((top == labels[:, None]).any(axis=1).mean())
        exits.append(ExitRow(k + 1, float(costs[k]), float(costs[k]) / full, params[k], float(correct[k].mean()), top5))

    curve = []
    n = labels.shape[0]
    for budget in budget_grid(costs, points):
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
                    cost=float(costs[chosen].mean()),
                    accuracy=float(correct[chosen, np.arange(n)].mean()),
                    val_cost=policy.expected_cost,
                    val_accuracy=policy.expected_accuracy,
                    exit_fractions=[float(f) for f in fractions],
                )
            )
    provenance = model.bundle.manifest.get("provenance", {})
    return ModelReport(
        name=_model_name(path, provenance),
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


def _model_name(path: str | os.PathLike, provenance: dict[str, Any]) -> str:
    name = Path(path).expanduser().resolve().name
    method = provenance.get("method")
    return f"{name} ({method})" if method and method not in name else name


def evaluate(paths: str | os.PathLike | Sequence[str | os.PathLike], data: str, split: str = "test", points: int = 15, **kwargs: Any) -> EvalReport:
    """Evaluate one or several bundles (or run directories) on the same split."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = EvalReport([evaluate_model(p, data, split, points, **kwargs) for p in paths])
    names = [m.name for m in report.models]
    for i, m in enumerate(report.models):  # overlaid plots need distinct labels
        if names.count(m.name) > 1:
            m.name = f"{m.name} #{i + 1}"
    return report


# --- plots (optional extra) -------------------------------------------------------------------------

def plot_report(report: EvalReport, out: Path) -> list[Path]:
    """Accuracy-versus-cost curves (all models overlaid) and exit histograms; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plots (pip install 'anytime[plot]')")
        return []
    written = []
    convention = report.models[0].cost_convention
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(report.models):
        color = f"C{i}"
        for policy, style in (("search", "-"), ("geometric", "--")):
            pts = m.points(policy)
            ax.plot([p.cost / 1e6 for p in pts], [100 * p.accuracy for p in pts], style, color=color,
                    label=f"{m.name}: budgeted, {policy}")
        ax.plot([e.cost / 1e6 for e in m.exits], [100 * e.top1 for e in m.exits], "o", color=color,
                label=f"{m.name}: single exits")
    ax.set_xlabel(f"average cost per image (M {convention})")
    ax.set_ylabel(f"top-1 accuracy on {report.models[0].split} (%)")
    ax.set_title("Budgeted classification: accuracy vs. average cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save_figure(fig, out / "accuracy_vs_cost.png"))
    plt.close(fig)

    fig, axes = plt.subplots(1, len(report.models), figsize=(5 * len(report.models), 3.5), squeeze=False)
    for ax, m in zip(axes[0], report.models):
        width = 0.8 / len(HISTOGRAM_FRACTIONS)
        for j, frac in enumerate(HISTOGRAM_FRACTIONS):
            p = _nearest_point(m, frac)
            xs = np.arange(1, len(m.exits) + 1) + (j - (len(HISTOGRAM_FRACTIONS) - 1) / 2) * width
            ax.bar(xs, [100 * f for f in p.exit_fractions], width=width,
                   label=f"budget {100 * p.budget_fraction:.0f}% (acc {100 * p.accuracy:.1f}%)")
        ax.set_xlabel("exit")
        ax.set_ylabel("images leaving here (%)")
        ax.set_title(m.name, fontsize=9)
        ax.set_xticks(range(1, len(m.exits) + 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save_figure(fig, out / "exit_histogram.png"))
    plt.close(fig)
    return written


def _save_figure(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _nearest_point(m: ModelReport, fraction: float, policy: str = "search") -> CurvePoint:
    return min(m.points(policy), key=lambda p: abs(p.budget_fraction - fraction))


# --- terminal summary -------------------------------------------------------------------------------

def summary_lines(report: EvalReport) -> list[str]:
    lines: list[str] = []
    for m in report.models:
        conv = m.cost_convention
        lines.append(f"{m.name}: {m.count} images of split '{m.split}' ({m.data}), {m.seconds:.1f}s")
        has_top5 = any(e.top5 is not None for e in m.exits)
        lines.append(f"  {'exit':>4}  {'cost (' + conv + ')':>14}  {'of full':>7}  {'params':>8}  {'top-1':>7}" + ("  top-5" if has_top5 else ""))
        for e in m.exits:
            params = "-" if e.params is None else format_cost(e.params)
            row = f"  {e.exit:>4}  {format_cost(e.cost):>14}  {100 * e.fraction:>6.1f}%  {params:>8}  {100 * e.top1:>6.2f}%"
            if has_top5:
                row += f"  {100 * e.top5:>5.2f}%" if e.top5 is not None else "      -"
            lines.append(row)
        lines.append(f"  budgeted (thresholds fitted on validation, measured on '{m.split}'):")
        lines.append(f"  {'budget':>14}  {'policy':>9}  {'realised cost':>14}  {'accuracy':>8}")
        for frac in HISTOGRAM_FRACTIONS + (1.0,):
            for policy in CURVE_POLICIES:
                p = _nearest_point(m, frac, policy)
                lines.append(
                    f"  {format_cost(p.budget) + f' ({100 * p.budget_fraction:.0f}%)':>14}  {policy:>9}  "
                    f"{format_cost(p.cost):>14}  {100 * p.accuracy:>7.2f}%"
                )
    return lines
