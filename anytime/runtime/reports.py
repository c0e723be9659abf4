"""Reports of an evaluation (`anytime.runtime.evaluation`): CSV and JSON files, PNG plots, the terminal summary.

Plots need matplotlib (`pip install 'anytime[plot]'`); without it the files are written and the plots
are skipped. Plots are drawn from the report's numbers only, so they can be redrawn from report.json.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from anytime.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from anytime.runtime.budget import TIME_CONVENTION, format_cost
from anytime.runtime.evaluation import CURVE_POLICIES, HISTOGRAM_FRACTIONS, CurvePoint, EvalReport, ModelReport

log = logging.getLogger(__name__)


PLOT_FILES = ("accuracy_vs_cost.png", "exit_histogram.png")


def save_report(report: EvalReport, directory: str | os.PathLike, plots: bool = True) -> list[Path]:
    """Write report.json, anytime.csv, budget_curve.csv and (with matplotlib) PNG plots; returns the files.
    Without plots, the plots of an earlier report in `directory` are removed (they would not match)."""
    out = Path(directory)
    written = [out / "report.json", out / "anytime.csv", out / "budget_curve.csv"]
    atomic_write_json(written[0], report.to_dict())
    atomic_write_text(
        written[1],
        _csv(
            ["model", "exit", "cost", "cost_convention", "fraction", "params", "top1", "top5"],
            [
                [m.name, e.exit, e.cost, m.cost_convention, e.fraction, e.params, e.top1, e.top5]
                for m in report.models
                for e in m.exits
            ],
        ),
    )
    atomic_write_text(
        written[2],
        _csv(
            [
                "model",
                "policy",
                "budget",
                "budget_fraction",
                "cost",
                "accuracy",
                "val_cost",
                "val_accuracy",
                "exit_fractions",
            ],
            [
                [
                    m.name,
                    p.policy,
                    p.budget,
                    p.budget_fraction,
                    p.cost,
                    p.accuracy,
                    p.val_cost,
                    p.val_accuracy,
                    " ".join(f"{f:.4f}" for f in p.exit_fractions),
                ]
                for m in report.models
                for p in m.curve
            ],
        ),
    )
    if plots:
        written += plot_report(report, out)
    for name in PLOT_FILES:  # an earlier report's plots would show other numbers than these files
        if out / name not in written and (out / name).is_file():
            (out / name).unlink()
            log.info("removed %s of an earlier report (no plots this time)", out / name)
    return written


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return buf.getvalue()


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
    conventions = list(dict.fromkeys(m.cost_convention for m in report.models))
    convention = conventions[0]
    scale, unit = (1e-3, "ms, latency profile") if convention == TIME_CONVENTION else (1e6, f"M {convention}")
    if len(conventions) > 1:  # one axis cannot hold costs counted differently: each model's share of its own
        unit = f"% of each model's full network, costs in {', '.join(conventions)}"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(report.models):
        color = f"C{i}"
        if len(conventions) > 1:
            scale = m.exits[-1].cost / 100
        for policy, style in (("search", "-"), ("geometric", "--")):
            # A line through realised costs: the search policy stops spending where the validation data shows no
            # gain, so a larger budget can realise a smaller cost, and budget order would draw the line backwards.
            pts = sorted(m.points(policy), key=lambda p: p.cost)
            ax.plot(
                [p.cost / scale for p in pts],
                [100 * p.accuracy for p in pts],
                style,
                color=color,
                label=f"{m.name}: budgeted, {policy}",
            )
        ax.plot(
            [e.cost / scale for e in m.exits],
            [100 * e.top1 for e in m.exits],
            "o",
            color=color,
            label=f"{m.name}: single exits",
        )
    ax.set_xlabel(f"average cost per image ({unit})")
    ax.set_ylabel(f"top-1 accuracy on {report.models[0].split} (%)")
    ax.set_title("Budgeted classification: accuracy vs. average cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save_figure(fig, out / PLOT_FILES[0]))
    plt.close(fig)

    fig, axes = plt.subplots(1, len(report.models), figsize=(5 * len(report.models), 3.5), squeeze=False)
    for ax, m in zip(axes[0], report.models):
        width = 0.8 / len(HISTOGRAM_FRACTIONS)
        for j, frac in enumerate(HISTOGRAM_FRACTIONS):
            p = _nearest_point(m, frac)
            xs = np.arange(1, len(m.exits) + 1) + (j - (len(HISTOGRAM_FRACTIONS) - 1) / 2) * width
            ax.bar(
                xs,
                [100 * f for f in p.exit_fractions],
                width=width,
                label=f"budget {100 * p.budget_fraction:.0f}% (acc {100 * p.accuracy:.1f}%)",
            )
        ax.set_xlabel("exit")
        ax.set_ylabel("images leaving here (%)")
        ax.set_title(m.name, fontsize=9)
        ax.set_xticks(range(1, len(m.exits) + 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save_figure(fig, out / PLOT_FILES[1]))
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


def _cost(value: float, convention: str) -> str:
    """A cost for a table whose header names the convention: 123.4M, or 312.4 µs for time."""
    return format_cost(value, convention if convention == TIME_CONVENTION else None)


def summary_lines(report: EvalReport) -> list[str]:
    lines: list[str] = []
    for m in report.models:
        conv = m.cost_convention
        lines.append(f"{m.name}: {m.count} images of split '{m.split}' ({m.data}), {m.seconds:.1f}s")
        has_top5 = any(e.top5 is not None for e in m.exits)
        lines.append(
            f"  {'exit':>4}  {'cost (' + conv + ')':>14}  {'of full':>7}  {'params':>8}  {'top-1':>7}"
            + ("  top-5" if has_top5 else "")
        )
        for e in m.exits:
            params = "-" if e.params is None else format_cost(e.params)
            row = f"  {e.exit:>4}  {_cost(e.cost, conv):>14}  {100 * e.fraction:>6.1f}%  {params:>8}  {100 * e.top1:>6.2f}%"
            if has_top5:
                row += f"  {100 * e.top5:>5.2f}%" if e.top5 is not None else "      -"
            lines.append(row)
        lines.append(f"  budgeted (thresholds fitted on validation, measured on '{m.split}'):")
        lines.append(f"  {'budget':>14}  {'policy':>9}  {'realised cost':>14}  {'accuracy':>8}")
        for frac in HISTOGRAM_FRACTIONS + (1.0,):
            for policy in CURVE_POLICIES:
                p = _nearest_point(m, frac, policy)
                lines.append(
                    f"  {_cost(p.budget, conv) + f' ({100 * p.budget_fraction:.0f}%)':>14}  {policy:>9}  "
                    f"{_cost(p.cost, conv):>14}  {100 * p.accuracy:>7.2f}%"
                )
    return lines
