"""Benchmark: DR-MGF against joint training and PCGrad trained to convergence, on the 2-core CPU machine.

For each architecture (msdnet-tiny, sdn-tiny) and paired seed, train on the same fixed subset of
Fashion-MNIST with each method for the same number of epochs (`--epochs`, chosen so that joint training
converges: its average test top-1 moves less than 0.3 points over its last quarter of epochs, which the
report checks), plus the equal-wall-clock pair:

  joint            E epochs
  pcgrad           E epochs (the best prior baseline in benchmarks/results/train_methods.md)
  drmgf            E epochs (T exit passes + 1 fusion pass per epoch: about (T+1)x a joint epoch)
  drmgf-rounds     E epochs, -m pass_steps=16 (a fusion every ~16 steps: rounds=4 at 4,000 images; the
                   interval that led joint at the default recipe and at 4,000 images; the same cost as drmgf)
  drmgf-steps8     E epochs, -m pass_steps=8 (a fusion every ~8 steps: 8 rounds at 4,000 images)
  drmgf-split      E epochs, -m passes=split (each exit pass over 1/T of the epoch: about 2x a joint epoch)
  drmgf-split-sum  E epochs, split passes in 4 rounds (4-step passes), each exit's update counted whole
                   (split_gain=T) and the fusion pass over a quarter of the epoch (fusion_share=0.25): about
                   1.25x a joint epoch plus the gated forward's extra work. Not in the default queue:
                   it collapsed (msdnet-tiny, seed 0: test average 9-12% after each of epochs 1-7, stopped; with
                   momentum=reset too, docs/drmgf.md)
  drmgf-split-matched  as drmgf-split-sum, with each exit's update scaled by T / (1 + rho (T - 1)) = 1.82
                   instead of T: each image's loss weights (its own exit 1, the others rho = 0.4) then add up to
                   joint's T, so the summed step is joint's to first order (at gain T it was 2.2x joint's,
                   which would explain the collapse). Not in the default queue
  joint-1.5x       1.5E epochs (about the wall-clock of drmgf-split-sum; not in the default queue)
  joint-2x         2E epochs (the wall-clock of drmgf-split)
  joint-5x         5E epochs (about the CPU time of drmgf and drmgf-rounds: DR-MGF at equal compute)
  drmgf-steps8-5x  5E epochs, -m pass_steps=8 (DR-MGF as long as joint-5x: is its plateau above joint's?)
  joint-25x        25E epochs (about the CPU time of drmgf-steps8-5x: equal compute where joint has
                   stopped improving). Neither is in the default queue (each about 25 CPU-minutes a run)
  drmgf-steps8-25x 25E epochs, -m pass_steps=8 (DR-MGF as long as joint-25x: equal epochs where joint
                   has about converged)
  joint-125x       125E epochs (about the CPU time of drmgf-steps8-25x: equal compute with both near their
                   plateaus, where the paper's claim lives). Neither is in the default queue (each about
                   2 CPU-hours a run)

Every epoch records the per-exit test accuracy (after the epoch's training and validation; not counted as
training time), so the report can plot average test accuracy against training time (CPU seconds of the one-thread run:
unlike wall time, unaffected by other runs sharing the cores).

Resumable and shareable between processes: each run is claimed by one worker (a claim file holding its
pid; a claim whose process is gone is taken over), an interrupted run continues from its epoch checkpoint,
and a finished run writes `benchmarks/results/train_convergence/<run>.json` atomically. Start one worker
per core you can spare; each uses one torch thread.

    python benchmarks/train_convergence.py run --runs-dir /tmp/conv      # work through the queue
    python benchmarks/train_convergence.py run --runs-dir /tmp/conv --max-runs 1
    python benchmarks/train_convergence.py report                       # table + plot from finished runs
    python benchmarks/train_convergence.py run --epochs 2 --train-limit 256 --seeds 0 --archs msdnet-tiny \\
        --runs-dir /tmp/smoke --results /tmp/smoke-results              # smoke test
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fashion-mnist.npz"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "train_convergence"
CONVERGED_POINTS = 0.3
EXITS = 4  # msdnet-tiny and sdn-tiny both have four exits
RHO = 0.4  # DR-MGF's default aux_weight: an exit pass's weight on the other exits' losses


@dataclass(frozen=True)
class Run:
    arch: str
    label: str  # method as reported (joint, drmgf-split, ...)
    method: str  # anytime method name
    seed: int
    epochs: int
    method_options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.label}-seed{self.seed}"


def plan(args: argparse.Namespace) -> list[Run]:
    """The queue, most informative first: every method of seed 0 for every arch, then the next seed."""
    e = args.epochs
    variants: list[tuple[str, str, int, dict[str, Any]]] = [
        ("joint", "joint", e, {}),
        ("drmgf", "drmgf", e, {"rounds": 1}),  # the paper's one fusion per epoch
        ("pcgrad", "pcgrad", e, {}),
        ("drmgf-rounds", "drmgf", e, {"pass_steps": 16}),  # recorded as rounds=4, what 16 gives at 4,000 images
        ("drmgf-steps8", "drmgf", e, {"pass_steps": 8}),
        ("drmgf-split", "drmgf", e, {"passes": "split", "rounds": 1}),
        (
            "drmgf-split-sum",
            "drmgf",
            e,
            {"passes": "split", "rounds": 4, "split_gain": float(EXITS), "fusion_share": 0.25},
        ),
        (
            "drmgf-split-matched",
            "drmgf",
            e,
            {"passes": "split", "rounds": 4, "split_gain": EXITS / (1 + RHO * (EXITS - 1)), "fusion_share": 0.25},
        ),
        ("joint-1.5x", "joint", e + e // 2, {}),
        ("joint-2x", "joint", 2 * e, {}),
        ("joint-5x", "joint", 5 * e, {}),
        ("drmgf-steps8-5x", "drmgf", 5 * e, {"pass_steps": 8}),
        ("joint-25x", "joint", 25 * e, {}),
        ("drmgf-steps8-25x", "drmgf", 25 * e, {"pass_steps": 8}),
        ("joint-125x", "joint", 125 * e, {}),
    ]
    runs = []
    for seed in args.seeds:
        for arch in args.archs:
            for label, method, epochs, options in variants:
                if label in args.methods:
                    runs.append(Run(arch, label, method, seed, epochs, options))
    return runs


# ------------------------------------------------------------------------------------------- claims
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def claim(directory: Path) -> bool:
    """Take the run in `directory` for this process, unless a live process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "claim.pid"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _alive(holder):
                return False
            path.unlink(missing_ok=True)  # the holder is gone: take the run over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


# ---------------------------------------------------------------------------------------------- run
def execute(run: Run, args: argparse.Namespace, results: Path) -> dict[str, Any]:
    import torch

    from anytime.fileio import atomic_write_json
    from anytime.training.config import TrainConfig
    from anytime.training.trainer import Trainer, resume, train

    torch.set_num_threads(args.threads)
    out = Path(args.runs_dir) / run.name

    def test_every_epoch(trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        if "split_gain" in run.method_options and trainer.model.num_exits != EXITS:
            raise SystemExit(
                f"{run.name}: split_gain={EXITS} assumes {EXITS} exits, the model has {trainer.model.num_exits}"
            )
        start = time.perf_counter()
        row["test_acc"] = trainer.evaluate(trainer.method.plain_model(trainer.model), trainer.dataset.test, None)
        row["test_eval_s"] = round(time.perf_counter() - start, 3)
        print(
            f"  {run.name} epoch {epoch + 1}/{run.epochs}: train {row['train_time_s']:.1f}s "
            f"test avg {100 * float(np.mean(row['test_acc'])):.2f}%",
            flush=True,
        )

    if (out / "checkpoints" / "last.pt").is_file():
        result = resume(out, epoch_hook=test_every_epoch)
    else:
        if out.exists():  # claimed, but stopped before its first epoch ended: start it again
            for child in out.iterdir():
                if child.name != "claim.pid":
                    _remove(child)
        config = TrainConfig(
            arch=run.arch, data=args.data, method=run.method, method_options=run.method_options,
            epochs=run.epochs, out=str(out), batch_size=64, lr=0.1, seed=run.seed, device="cpu",
            val_size=args.val_size, train_limit=args.train_limit or None,
        )  # fmt: skip
        result = train(config, epoch_hook=test_every_epoch)
    history = [
        {
            "epoch": r["epoch"],
            "lr": r["lr"],
            "train_time_s": r["train_time_s"],
            "train_cpu_s": r["train_cpu_s"],
            "val_acc": r["val_acc"],
            "test_acc": r["test_acc"],
        }
        for r in result.history
    ]
    record = {
        **asdict(run),
        "name": run.name,
        "test_accuracy": result.test_accuracy,
        "val_accuracy": result.val_accuracy,
        "train_time_s": float(sum(r["train_time_s"] for r in history)),
        "train_cpu_s": float(sum(r["train_cpu_s"] for r in history)),
        "history": history,
        "train_limit": args.train_limit,
        "val_size": args.val_size,
        "machine": machine(),
        # CPU time per epoch drifts between sessions on a shared VM; the report compares each run with a
        # joint run of its own session.
        "session": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    atomic_write_json(results / f"{run.name}.json", record)
    return record


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path) if path.is_dir() else path.unlink()


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def work(args: argparse.Namespace) -> None:
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    done = 0
    for run in plan(args):
        if (results / f"{run.name}.json").is_file():
            continue
        if not claim(Path(args.runs_dir) / run.name):
            continue
        print(f"{run.name}: {run.epochs} epochs", flush=True)
        record = execute(run, args, results)
        print(
            f"{run.name}: test avg {100 * float(np.mean(record['test_accuracy'])):.2f}% "
            f"in {record['train_time_s'] / 60:.1f} min of training",
            flush=True,
        )
        report(args)
        done += 1
        if args.max_runs and done >= args.max_runs:
            break


# ------------------------------------------------------------------------------------------- report
def load_records(results: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def pm(values: list[float], digits: int = 2) -> str:
    a = 100 * np.asarray(values, dtype=float)
    if len(a) == 1:
        return f"{a[0]:.{digits}f}"
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}"


def converged(record: dict[str, Any]) -> tuple[bool, float]:
    """Whether the average test top-1 moved less than 0.3 points over the last quarter of the epochs."""
    curve = [100 * float(np.mean(h["test_acc"])) for h in record["history"]]
    tail = curve[-max(2, math.ceil(len(curve) / 4)) :]
    spread = max(tail) - min(tail)
    return spread < CONVERGED_POINTS, spread


def joint_epoch_cpu(records: list[dict[str, Any]], run: dict[str, Any]) -> float | None:
    """CPU seconds of one joint epoch on the same arch and seed, from a joint run of `run`'s session
    (joint, else the shortest of joint-2x, joint-5x: the same work per epoch); runs without a session are
    the first sessions'."""
    same = [
        r
        for r in records
        if r["method"] == "joint"
        and not r["method_options"]
        and r["arch"] == run["arch"]
        and r["seed"] == run["seed"]
        and r.get("session") == run.get("session")
    ]
    if not same:
        return None
    reference = min(same, key=lambda r: r["epochs"])  # the plain joint run where the session has one
    return float(reference["train_cpu_s"] / reference["epochs"])


REPORT_ORDER = [
    "joint",
    "pcgrad",
    "drmgf",
    "drmgf-rounds",
    "drmgf-steps8",
    "drmgf-split",
    "drmgf-split-sum",
    "drmgf-split-matched",
    "joint-1.5x",
    "joint-2x",
    "joint-5x",
    "drmgf-steps8-5x",
    "joint-25x",
    "drmgf-steps8-25x",
    "joint-125x",
]


# (a, b, what the pair compares): reported as a − b over the seeds both have.
COMPARISONS = [
    ("drmgf-steps8", "joint-5x", "equal compute at 16 DR-MGF epochs"),
    ("drmgf-steps8-5x", "joint-5x", "equal epochs (80)"),
    ("drmgf-steps8-5x", "joint-25x", "equal compute at 80 DR-MGF epochs"),
    ("drmgf-steps8-25x", "joint-25x", "equal epochs (400)"),
    ("drmgf-steps8-25x", "joint-125x", "equal compute at 400 DR-MGF epochs"),
]


def _paired_comparisons(records: list[dict[str, Any]]) -> list[str]:
    out = []
    for a, b, what in COMPARISONS:
        by_seed = {label: {r["seed"]: r for r in records if r["label"] == label} for label in (a, b)}
        seeds = sorted(set(by_seed[a]) & set(by_seed[b]))
        if not seeds:
            continue
        diffs = [
            100 * (float(np.mean(by_seed[a][s]["test_accuracy"])) - float(np.mean(by_seed[b][s]["test_accuracy"])))
            for s in seeds
        ]
        each = ", ".join(f"{d:+.2f}" for d in diffs)
        # Both runs' own CPU time: a check on "equal compute" that needs no joint epoch of the same session.
        cpu = float(np.mean([by_seed[a][s]["train_cpu_s"] / by_seed[b][s]["train_cpu_s"] for s in seeds]))
        out.append(
            f"{a} − {b} ({what}): {np.mean(diffs):+.2f} (seed{'s' if len(seeds) > 1 else ''} "
            f"{','.join(map(str, seeds))}: {each}; CPU time {cpu:.2f}× {b}'s)"
        )
    return out


def make_report(records: list[dict[str, Any]]) -> str:
    lines = []
    for arch in dict.fromkeys(r["arch"] for r in records):
        rs = [r for r in records if r["arch"] == arch]
        exits = len(rs[0]["test_accuracy"])
        joint = {r["seed"]: r for r in rs if r["label"] == "joint"}
        lines.append(f"## {arch}\n")
        head = (
            ["method", "epochs", "seeds"]
            + [f"exit {t + 1}" for t in range(exits)]
            + ["avg over exits", "avg − joint (paired)", "train CPU time (min)", "× joint", "train wall time (min)"]
        )
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label in [m for m in REPORT_ORDER if any(r["label"] == m for r in rs)]:
            group = sorted((r for r in rs if r["label"] == label), key=lambda r: r["seed"])
            means = [float(np.mean(r["test_accuracy"])) for r in group]
            paired = [
                m - float(np.mean(joint[r["seed"]]["test_accuracy"]))
                for m, r in zip(means, group)
                if r["seed"] in joint
            ]
            ratios = [
                r["train_cpu_s"] / (epoch_cpu * joint[r["seed"]]["epochs"])
                for r in group
                if r["seed"] in joint and (epoch_cpu := joint_epoch_cpu(records, r))
            ]
            cells = [label, str(group[0]["epochs"]), ",".join(str(r["seed"]) for r in group)]
            cells += [pm([r["test_accuracy"][t] for r in group]) for t in range(exits)]
            cells.append(pm(means))
            cells.append(("+" if np.mean(paired) >= 0 else "") + pm(paired) if paired and label != "joint" else "")
            cells.append(f"{np.mean([r['train_cpu_s'] for r in group]) / 60:.1f}")
            cells.append(f"{np.mean(ratios):.2f}" if ratios else "")
            cells.append(f"{np.mean([r['train_time_s'] for r in group]) / 60:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        pairs = _paired_comparisons(rs)
        if pairs:
            lines.append("\nPaired comparisons (average over exits, same seeds): " + "; ".join(pairs) + ".")
        checks = []
        for label in [m for m in REPORT_ORDER if m.startswith("joint")]:
            runs = sorted((r for r in rs if r["label"] == label), key=lambda r: r["seed"])
            if runs:
                states = [(r["seed"], *converged(r)) for r in runs]
                checks.append(
                    f"{label}: "
                    + ", ".join(f"seed {s} {spread:.2f}{'' if ok else ' (NOT converged)'}" for s, ok, spread in states)
                )
        if checks:
            lines.append(
                "\nConvergence of joint training (spread of its average test top-1 over the last quarter of its "
                f"epochs, points; criterion < {CONVERGED_POINTS}): " + "; ".join(checks) + "."
            )
        lines.append("")
    first = records[0]
    m = first["machine"]
    lines.append(
        f"Fashion-MNIST (`../shared/data/fashion-mnist.npz`): training on the first {first['train_limit']} training "
        f"images (a fixed subset; the {first['val_size']}-image validation hold-out is taken before it), test top-1 "
        "(%) on all 10,000 test images after the last epoch, mean ± std over paired seeds (the same seed gives "
        "every method the same initial weights, split and data order). Batch 64, SGD lr 0.1 (/10 at 50% and 75% "
        "of the epochs), momentum 0.9, weight decay 1e-4. Train CPU time is the process's CPU time over the training "
        "phases (evaluation excluded): each run uses one thread, so it measures the run's compute even when runs "
        "share the cores, which wall time does not; × joint is its ratio to the same seed's joint run, priced at the "
        "CPU time of a joint epoch measured in the same session (runs of later sessions were timed against their "
        "own joint-2x or joint-5x run: the VM's speed drifts between sessions, so CPU minutes of different "
        "sessions do not compare). Plot: `train_convergence.png`, average test top-1 against cumulative training "
        "compute in joint epochs (CPU time over the same session's joint epoch). "
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} at "
        f"{m['threads']} thread per run (up to two runs at a time)."
    )
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from anytime.fileio import atomic_write_bytes

    archs = list(dict.fromkeys(r["arch"] for r in records))
    fig, axes = plt.subplots(1, len(archs), figsize=(6.2 * len(archs), 4.4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        # One colour per method across the panels, in the report's order.
        for label in sorted(dict.fromkeys(r["label"] for r in records if r["arch"] == arch), key=REPORT_ORDER.index):
            group = [r for r in records if r["arch"] == arch and r["label"] == label]
            n = min(len(r["history"]) for r in group)
            priced = [(r, joint_epoch_cpu(records, r)) for r in group]
            priced = [(r, c) for r, c in priced if c]
            if not priced:
                continue
            t = np.mean([np.cumsum([h["train_cpu_s"] for h in r["history"][:n]]) / c for r, c in priced], axis=0)
            acc = np.mean([[100 * np.mean(h["test_acc"]) for h in r["history"][:n]] for r in group], axis=0)
            ax.plot(
                t,
                acc,
                marker="." if n <= 100 else None,
                color=plt.get_cmap("tab20")(REPORT_ORDER.index(label) % 20),
                label=f"{label} ({len(group)} seed{'s' if len(group) > 1 else ''})",
            )
        ax.set_title(arch)
        # Runs span 16 to 400 joint epochs of compute: a log axis keeps the short runs readable.
        ax.set_xscale("log")
        ax.set_xlabel("training compute (joint epochs of CPU time, one thread; log scale)")
        ax.set_ylabel("average test top-1 over exits (%)")
        ax.grid(alpha=0.3)
        lo = min(100 * np.mean(r["history"][-1]["test_acc"]) for r in records if r["arch"] == arch)
        ax.set_ylim(lo - 6, None)
        ax.legend(fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def report(args: argparse.Namespace) -> None:
    from anytime.fileio import atomic_write_text

    results = Path(args.results)
    records = load_records(results)
    if not records:
        print("no finished runs yet")
        return
    text = make_report(records)
    atomic_write_text(results.with_suffix(".md"), "# Training to convergence: DR-MGF, joint, PCGrad\n\n" + text)
    plotted = plot(records, results.with_suffix(".png"))
    print(text)
    print(f"wrote {results.with_suffix('.md')}" + (f" and {results.with_suffix('.png')}" if plotted else ""))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report", "plan"])
    p.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    p.add_argument("--archs", type=lambda s: s.split(","), default=["msdnet-tiny", "sdn-tiny"])
    p.add_argument(
        "--methods",
        type=lambda s: s.split(","),
        default=["joint", "pcgrad", "drmgf", "drmgf-rounds", "drmgf-steps8", "drmgf-split", "joint-2x", "joint-5x"],
    )
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--train-limit", type=int, default=4000)
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "convergence"))
    p.add_argument("--results", default=str(DEFAULT_RESULTS))
    p.add_argument("--max-runs", type=int, default=0, help="stop after this many runs (0: the whole queue)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "plan":
        for run in plan(args):
            done = (Path(args.results) / f"{run.name}.json").is_file()
            print(f"{'done' if done else 'todo'}  {run.name}  {run.epochs} epochs  {run.method_options or ''}")
    elif args.command == "run":
        work(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
