"""How similar the exits' learned routes are (DR-MGF importance variables).

For every gated shared conv layer, the route of exit t is its importance |M_t| ([O, I/groups]); the
similarity of two exits' routes is the cosine of the flattened |M_t| and |M_j|. The table lists each
layer's mean and least similar pair, then the exit-by-exit matrix averaged over the layers both exits
share. Identical routes (the state at initialisation) give 1. `anytime routes RUN_DIR` prints the report.
"""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from anytime.errors import ConfigError
from anytime.formats.rundir import CHECKPOINT, CONFIG_FILE


def find_analysis(payload: Any) -> dict[str, Any] | None:
    """The method's analysis dict: checkpoint["method"]["analysis"] as the trainer writes it."""
    if not isinstance(payload, dict):
        return None
    method = payload.get("method")
    analysis = method.get("analysis") if isinstance(method, dict) else None
    if analysis is None:
        analysis = payload.get("analysis")  # a bare {"analysis": ...} file
    return analysis if isinstance(analysis, dict) else None


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.abs().flatten().double(), b.abs().flatten().double()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else float("nan")


def route_similarity(importance: dict[str, dict[str, Any]], num_exits: int) -> dict[str, Any]:
    """Per-layer pairwise cosines and the exit x exit matrix averaged over shared layers (1-based exits)."""
    layers = []
    sums = [[0.0] * num_exits for _ in range(num_exits)]
    counts = [[0] * num_exits for _ in range(num_exits)]
    for name, entry in importance.items():
        exits = [int(t) for t in entry["exits"]]
        values = entry["values"]
        pairs: dict[str, float | None] = {}
        for (a, ta), (b, tb) in combinations(enumerate(exits), 2):
            value = cosine(values[a], values[b])
            if not math.isfinite(value):  # an all-zero route: no direction to compare (JSON null)
                pairs[f"{ta + 1}-{tb + 1}"] = None
                continue
            pairs[f"{ta + 1}-{tb + 1}"] = value
            for i, j in ((ta, tb), (tb, ta)):
                sums[i][j] += value
                counts[i][j] += 1
        finite = {k: v for k, v in pairs.items() if v is not None}
        least = min(finite, key=finite.__getitem__) if finite else None
        layers.append(
            {
                "name": name,
                "exits": [t + 1 for t in exits],
                "mean": sum(finite.values()) / len(finite) if finite else None,
                "min": finite[least] if least is not None else None,
                "min_pair": least,
                "pairs": pairs,
            }
        )
    matrix: list[list[float | None]] = [
        [1.0 if i == j else (sums[i][j] / counts[i][j] if counts[i][j] else None) for j in range(num_exits)]
        for i in range(num_exits)
    ]
    return {"exits": list(range(1, num_exits + 1)), "layers": layers, "matrix": matrix}


def load_routes(run_dir: Path) -> dict[str, Any]:
    """Read the run's last checkpoint and compute the route similarity report."""
    from anytime.training.checkpoint import load_checkpoint

    path = run_dir / CHECKPOINT
    if not run_dir.is_dir():
        what = "is a file, not a directory" if run_dir.exists() else "does not exist"
        raise ConfigError(f"run directory {run_dir} {what}; pass the -o/--output directory of `anytime train`")
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} has no {CHECKPOINT}: it is not a training run directory, or its first epoch has not "
            "finished yet"
        )
    payload = load_checkpoint(path)
    analysis = find_analysis(payload)
    method = _method_name(run_dir, payload, analysis)
    if analysis is None or not analysis.get("importance"):
        raise ConfigError(
            f"run {run_dir} (method '{method}') has no importance variables: routes exist only for runs "
            "trained with dynamic routes, i.e. --method drmgf or dr-avgf"
        )
    num_exits = int(analysis.get("num_exits") or 1 + max(max(e["exits"]) for e in analysis["importance"].values()))
    report = route_similarity(analysis["importance"], num_exits)
    report.update({"run_dir": str(run_dir), "method": method, "epoch": _epoch(payload)})
    return report


def _method_name(run_dir: Path, payload: dict[str, Any], analysis: dict[str, Any] | None) -> str:
    if analysis is not None and "method" in analysis:
        return str(analysis["method"])
    try:
        return str(json.loads((run_dir / CONFIG_FILE).read_text())["method"])
    except (OSError, ValueError, KeyError, TypeError):
        method = payload.get("method")
        return str(method.get("name", "unknown")) if isinstance(method, dict) else "unknown"


def _epoch(payload: dict[str, Any]) -> int | None:
    epoch = payload.get("epoch")
    return int(epoch) if isinstance(epoch, (int, float)) else None


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def format_report(report: dict[str, Any]) -> str:
    epoch = f", checkpoint epoch {report['epoch']}" if report.get("epoch") is not None else ""
    lines = [
        f"Route similarity of {report['run_dir']} (method {report['method']}{epoch})",
        "cosine similarity of the exits' importance variables |M| per gated shared conv layer (1 = same route)",
        "",
    ]
    width = max([len("layer")] + [len(layer["name"]) for layer in report["layers"]])
    lines.append(f"{'layer':<{width}}  {'exits':<10} {'mean':>7} {'min':>7}  least similar")
    for layer in report["layers"]:
        exits = ",".join(str(t) for t in layer["exits"])
        pair = f"exits {layer['min_pair']}" if layer["min_pair"] else "-"
        lines.append(f"{layer['name']:<{width}}  {exits:<10} {_fmt(layer['mean']):>7} {_fmt(layer['min']):>7}  {pair}")
    lines += ["", "averaged over the layers both exits share:"]
    lines.append("        " + "".join(f"{'exit ' + str(t):>8}" for t in report["exits"]))
    for t, row in zip(report["exits"], report["matrix"]):
        lines.append(f"{'exit ' + str(t):<8}" + "".join(f"{_fmt(v):>8}" for v in row))
    return "\n".join(lines)
