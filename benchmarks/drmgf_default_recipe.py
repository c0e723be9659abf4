"""Where DR-MGF loses at the default model's recipe: each part of the method switched off in turn.

The embedded default's recipe (msdnet-tiny, the first 20,000 Fashion-MNIST training images, 6 epochs, batch
64, lr 0.1) is where DR-MGF is furthest below joint training (README). Each variant below is one
`anytime train` run; a finished run's test accuracies are kept in
`benchmarks/results/drmgf_default_recipe/<variant>-seed<S>.json`, so the table can be rebuilt and the
runs spread over sessions (an interrupted run resumes from its checkpoint).

    python benchmarks/drmgf_default_recipe.py run --seeds 0 --variants joint,drmgf --runs-dir runs/recipe
    python benchmarks/drmgf_default_recipe.py report

One thread per run; two runs may share a 2-core machine (the accuracies do not depend on it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from anytime.fileio import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "drmgf_default_recipe"

# name -> (method, method options, lr, what it tells)
VARIANTS: dict[str, tuple[str, list[str], float, str]] = {
    "joint": ("joint", [], 0.1, "the baseline"),
    "drmgf": ("drmgf", [], 0.1, "the method (gated exit passes in epochs 1-3, meta fusion)"),
    "drmgf-lr0.18": ("drmgf", [], 0.18, "the exit passes' loss weight (2.2 against 4) made up by the lr"),
    "drmgf-switch1": ("drmgf", ["switch_epoch=1"], 0.1, "gated exit passes in epoch 1 only"),
    "dr-avgf": ("dr-avgf", [], 0.1, "gated exit passes, plain mean fusion"),
    "meta-gf": ("meta-gf", [], 0.1, "plain exit passes, meta fusion"),
    "passes-mean": ("drmgf", ["gate=false", "fusion=mean"], 0.1, "plain exit passes, plain mean fusion"),
    "drmgf-implr0": (
        "drmgf",
        ["importance_lr=0"],
        0.1,
        "gated exit passes with the importance frozen at its start (routes fixed; only V trains)",
    ),
    "drmgf-implr0.1": ("drmgf", ["importance_lr=0.1"], 0.1, "the importance variables at a tenth of the lr"),
    "drmgf-implr2": ("drmgf", ["importance_lr=2"], 0.1, "the importance variables at twice the lr"),
    "drmgf-aux1": (
        "drmgf",
        ["aux_weight=1"],
        0.1,
        "every exit pass weighs all exits' losses like joint (ρ = 1): the fused step as long as joint's",
    ),
    "drmgf-anchor": (
        "drmgf",
        ["importance_start=fused"],
        0.1,
        "each epoch's gated passes start from the fused network (importance re-anchored), routes learned within",
    ),
    "drmgf-rounds5": (
        "drmgf",
        ["rounds=5"],
        0.1,
        "five fusions an epoch, each exit pass 1/5 of the epoch from the last fusion (63 steps, as at 4,000 "
        "images where DR-MGF led): do long passes drift apart before they are merged?",
    ),
    "drmgf-rounds20": (
        "drmgf",
        ["rounds=20"],
        0.1,
        "twenty fusions an epoch (16 steps a pass): does the gap keep shrinking as passes shorten?",
    ),
    "drmgf-steps8": (
        "drmgf",
        ["pass_steps=8"],
        0.1,
        "8-step exit passes (39 fusions an epoch; the method's default since): shorter than 16 led at 4,000 images; here too?",
    ),
    "passes-mean-rounds5": (
        "drmgf",
        ["gate=false", "fusion=mean", "rounds=5"],
        0.1,
        "plain exit passes, plain mean fusion, five fusions an epoch: the structure's own cost with short passes",
    ),
}


def run(args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for seed in args.seeds:
        for name in args.variants:
            method, options, lr, _ = VARIANTS[name]
            if method != "joint" and not any(o.startswith(("rounds=", "pass_steps=")) for o in options):
                # measured with the paper's one fusion per epoch, the default before -m pass_steps
                options = [*options, "rounds=1"]
            result = RESULTS / f"{name}-seed{seed}.json"
            if result.is_file():
                continue
            out = Path(args.runs_dir) / f"{name}-seed{seed}"
            if not (out / "summary.json").is_file():
                if (out / "checkpoints" / "last.pt").is_file():
                    cmd = ["train", "--resume", str(out), "--device", "cpu", "-q"]
                else:
                    cmd = ["train", "--arch", "msdnet-tiny", "--data", f"npz:{args.data}", "--method", method]
                    cmd += [a for opt in options for a in ("-m", opt)]
                    cmd += ["--lr", str(lr), "--epochs", "6", "--seed", str(seed), "--train-limit", "20000"]
                    cmd += ["--device", "cpu", "-q", "-o", str(out)]
                subprocess.run([sys.executable, "-m", "anytime.cli", *cmd], check=True, env=env)
            summary = json.loads((out / "summary.json").read_text())
            record = {
                "variant": name,
                "seed": seed,
                "method": method,
                "method_options": options,
                "lr": lr,
                "test_accuracy": summary["test_accuracy"],
                "train_time_s": summary["train_time_s"],
            }
            atomic_write_json(result, record)
            print(f"{name} seed {seed}: {100 * np.mean(record['test_accuracy']):.2f}")


def report(args: argparse.Namespace) -> None:
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    joint = {r["seed"]: float(np.mean(r["test_accuracy"])) for r in records if r["variant"] == "joint"}
    seeds = sorted({r["seed"] for r in records})
    lines = [
        "# DR-MGF at the default model's recipe, part by part\n",
        "msdnet-tiny, Fashion-MNIST, the first 20,000 training images, 6 epochs, batch 64, SGD (lr /10 at 50% "
        "and 75% of the epochs), average test top-1 (%) over the 4 exits on all 10,000 test images; "
        "`benchmarks/drmgf_default_recipe.py`, one thread per run on the 2-core CPU machine.\n",
        "| variant | what it tells | " + " | ".join(f"seed {s}" for s in seeds) + " | − joint (paired: mean ± std) |",
        "|---|---|" + "---|" * len(seeds) + "---|",
    ]
    for name, (_, _, _, what) in VARIANTS.items():
        mine = {r["seed"]: float(np.mean(r["test_accuracy"])) for r in records if r["variant"] == name}
        if not mine:
            continue
        cells = [f"{100 * mine[s]:.2f}" if s in mine else "" for s in seeds]
        diffs = [mine[s] - joint[s] for s in mine if s in joint]
        spread = f" ± {100 * np.std(diffs, ddof=1):.2f}" if len(diffs) > 1 else ""
        diff = (
            f"{100 * np.mean(diffs):+.2f}{spread} ({len(diffs)} seed{'s' if len(diffs) > 1 else ''})" if diffs else ""
        )
        lines.append(f"| {name} | {what} | " + " | ".join(cells) + f" | {diff if name != 'joint' else ''} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(ROOT / "benchmarks" / "results" / "drmgf_default_recipe.md", text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("run")
    pr.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0])
    pr.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    pr.add_argument("--runs-dir", default=str(ROOT / "runs" / "drmgf-default-recipe"))
    pr.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fashion-mnist.npz"))
    sub.add_parser("report")
    args = parser.parse_args()
    {"run": run, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
