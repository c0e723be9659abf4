"""Benchmark: training methods for multi-exit networks on Fashion-MNIST (same epochs, same schedule).

Trains `--arch` (default msdnet-tiny, 4 exits) with each method in `--methods` for every seed in `--seeds`,
then reports per-exit test accuracy, the average over exits (mean ± std over seeds), training wall time
per epoch and relative to joint. With `joint` and `drmgf` both in the list it also trains joint for as
many epochs as fit in DR-MGF's training wall time (equal compute; lr schedule scaled to those epochs).

Defaults are sized for a 2-core CPU within about 90 minutes: the first `--train-limit` training images
(a fixed subset, the same for every run; the validation hold-out is taken before the subset), 4 epochs.
Test accuracy is always on the full 10,000-image test set.

    python benchmarks/train_methods.py                       # the committed configuration
    python benchmarks/train_methods.py --train-limit 256 --epochs 1 --seeds 0 --val-size 200   # smoke test
    python benchmarks/train_methods.py --methods "joint,drmgf,drmgf[momentum=reset],drmgf[switch_epoch=1]"

A method entry may carry options in brackets, `name[key=value;key=value]`; the entry is its label.

Writes benchmarks/results/train_methods.md (the table) and train_methods.json (every run's numbers).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from anytime.fileio import atomic_write_json, atomic_write_text
from anytime.training.config import TrainConfig
from anytime.training.trainer import RunResult, resume, train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fashion-mnist.npz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=f"npz:{DEFAULT_DATA}", help="KIND:PATH of the data set")
    p.add_argument("--arch", default="msdnet-tiny")
    p.add_argument("--methods", default="joint,ge,pcgrad,drmgf", help="comma-separated method names")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-limit", type=int, default=4000, help="train on the first N training images (0: all)")
    p.add_argument("--val-size", type=int, default=2000, help="validation hold-out (evaluated every epoch)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-equal-compute", action="store_true", help="skip joint trained for DR-MGF's wall time")
    p.add_argument("--runs-dir", default=None, help="where run directories go (default: a temporary directory)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "train_methods.md"))
    p.add_argument(
        "--keep-rows",
        default=None,
        help="a directory (committed) that keeps each finished run's row and split: a later session whose runs "
        "directory is gone takes finished runs from it instead of training them again",
    )
    return p.parse_args(argv)


KEPT_FILES = ("benchmark_row.json", "split.json", "config.json")


def restore_kept(keep: Path, runs: Path) -> None:
    """Put the kept rows of finished runs back into the runs directory (only where the run is missing)."""
    for kept in sorted(keep.glob("*/benchmark_row.json")):
        out = runs / kept.parent.name
        if not (out / "benchmark_row.json").is_file():
            out.mkdir(parents=True, exist_ok=True)
            for name in KEPT_FILES:
                if (kept.parent / name).is_file():
                    atomic_write_text(out / name, (kept.parent / name).read_text())


def keep_row(out: Path, keep: Path) -> None:
    (keep / out.name).mkdir(parents=True, exist_ok=True)
    for name in KEPT_FILES:
        if (out / name).is_file():
            atomic_write_text(keep / out.name / name, (out / name).read_text())


def split_entry(entry: str) -> tuple[str, dict[str, str]]:
    """'drmgf[momentum=reset;switch_epoch=1]' -> ('drmgf', {'momentum': 'reset', 'switch_epoch': '1'})."""
    name, _, rest = entry.partition("[")
    options = {}
    for pair in rest.rstrip("]").split(";"):
        if pair.strip():
            key, _, value = pair.partition("=")
            options[key.strip()] = value.strip()
    return name.strip(), options


def run_one(args: argparse.Namespace, runs: Path, method: str, seed: int, epochs: int, tag: str = "") -> dict:
    out = runs / f"{method.replace('[', '_').replace(']', '').replace(';', '_').replace('=', '-')}{tag}-seed{seed}"
    row_file = out / "benchmark_row.json"
    if row_file.is_file():  # finished before an interruption: rerunning the benchmark skips it
        return json.loads(row_file.read_text())
    name, options = split_entry(method)
    config = TrainConfig(
        arch=args.arch, data=args.data, method=name, method_options=options, epochs=epochs, out=str(out), batch_size=args.batch_size,
        lr=args.lr, seed=seed, device=args.device, val_size=args.val_size,
        train_limit=args.train_limit or None,
    )  # fmt: skip
    start = time.perf_counter()
    # A run interrupted mid-way continues from its last epoch checkpoint (per-epoch times stay exact).
    result: RunResult = resume(out) if (out / "checkpoints" / "last.pt").is_file() else train(config)
    wall = time.perf_counter() - start
    train_time = float(sum(r["train_time_s"] for r in result.history))
    row = {
        "method": method + tag,
        "seed": seed,
        "epochs": epochs,
        "test_accuracy": result.test_accuracy,
        "test_accuracy_mean": result.test_mean,
        "val_accuracy": result.val_accuracy,
        "train_time_s": train_time,
        "epoch_time_s": train_time / epochs,
        "wall_time_s": wall,
        "images_per_s": float(np.mean([r["images_per_s"] for r in result.history])),
    }
    atomic_write_json(row_file, row)
    if args.keep_rows:
        keep_row(out, Path(args.keep_rows))
    print(
        f"  {row['method']:<14} seed {seed}  {epochs} ep  test avg {100 * row['test_accuracy_mean']:.2f}%  "
        f"per exit {' '.join(f'{100 * a:.1f}' for a in row['test_accuracy'])}  "
        f"{row['epoch_time_s']:.1f} s/epoch",
        flush=True,
    )
    return row


def pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    a = np.asarray(values, dtype=float) * scale
    std = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{a.mean():.{digits}f} ± {std:.{digits}f}"


def make_table(rows: list[dict], args: argparse.Namespace, num_exits: int, n_train: int) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    # Load on a shared machine drifts over a long benchmark, so each run is compared with the joint run of
    # its own seed (trained minutes apart in the same process), then the ratios are averaged.
    joint_epoch = {r["seed"]: r["epoch_time_s"] for r in rows if r["method"] == "joint"}
    head = (
        ["method", "epochs"] + [f"exit {t + 1}" for t in range(num_exits)] + ["avg over exits", "s / epoch", "× joint"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        epochs = sorted({r["epochs"] for r in rs})
        cells = [m, "/".join(map(str, epochs))]
        cells += [pm([r["test_accuracy"][t] for r in rs]) for t in range(num_exits)]
        cells.append(pm([r["test_accuracy_mean"] for r in rs]))
        epoch_time = float(np.mean([r["epoch_time_s"] for r in rs]))
        cells.append(f"{epoch_time:.1f}")
        ratios = [r["epoch_time_s"] / joint_epoch[r["seed"]] for r in rs if r["seed"] in joint_epoch]
        cells.append(f"{np.mean(ratios):.2f}" if ratios else "-")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in rows})
    note = (
        f"\n{args.arch} on {args.data.split(':', 1)[0]} ({Path(args.data.split(':', 1)[1]).name}): test top-1 accuracy "
        f"(%) on the full test set, mean ± std over seeds {seeds}; training on the first {n_train} training images "
        f"(fixed subset), validation hold-out {args.val_size}; batch {args.batch_size}, SGD lr {args.lr} (/10 at 50% and "
        f"75% of the epochs), momentum 0.9, weight decay 1e-4. s / epoch is training wall time (without evaluation), × joint its ratio to the same seed's joint run, on "
        f"{args.device} ({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}).\n"
    )
    if any(r["method"] == "joint (equal compute)" for r in rows):
        note += (
            "`joint (equal compute)` is joint trained for as many epochs as fit in DR-MGF's training wall time "
            "(same schedule shape).\n"
        )
    return "\n".join(lines) + "\n" + note


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in re.split(r",(?![^\[]*\])", args.methods) if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="anytime-bench-"))
    runs.mkdir(parents=True, exist_ok=True)
    if args.keep_rows:
        restore_kept(Path(args.keep_rows), runs)
    print(f"runs in {runs}", flush=True)

    rows: list[dict] = []
    for seed in seeds:
        print(f"seed {seed}", flush=True)
        by_method = {}
        for method in methods:
            row = run_one(args, runs, method, seed, args.epochs)
            rows.append(row)
            by_method[method] = row
        if not args.no_equal_compute and "joint" in by_method and "drmgf" in by_method:
            budget = by_method["drmgf"]["train_time_s"]
            epochs = max(1, int(round(budget / by_method["joint"]["epoch_time_s"])))
            rows.append(run_one(args, runs, "joint", seed, epochs, tag=" (equal compute)"))
    # Runs reused from an interrupted benchmark count with the time they took when they ran.
    total = sum(r["wall_time_s"] for r in rows)

    num_exits = len(rows[0]["test_accuracy"])
    n_train = _train_count(runs, rows[0])
    table = make_table(rows, args, num_exits, n_train)
    print("\n" + table)
    print(f"sum of the runs' wall times {total / 60:.1f} min")

    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        results, f"# Training methods on {args.arch}\n\n{table}\nSum of the runs' wall times: {total / 60:.1f} min.\n"
    )
    raw = {
        "args": vars(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "total_time_s": total,
        "runs": rows,
    }
    atomic_write_json(results.with_suffix(".json"), raw)
    print(f"wrote {results} and {results.with_suffix('.json')}")


def _train_count(runs: Path, row: dict) -> int:
    out = next(p for p in runs.iterdir() if p.name.endswith(f"-seed{row['seed']}") and (p / "split.json").is_file())
    split = json.loads((out / "split.json").read_text())
    config = json.loads((out / "config.json").read_text())
    n = split["train_count"]
    return min(n, config["train_limit"]) if config.get("train_limit") else n


if __name__ == "__main__":
    sys.exit(main())
