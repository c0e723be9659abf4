"""Benchmark: training time per epoch of joint training and DR-MGF under the trainer's speed options.

Made for the GPU check of DR-MGF's cost (docs/drmgf.md: one epoch should cost about T + 1 joint epochs; an
earlier H100 measurement had the gated epoch at 10.5x from kernel-launch overhead). It runs wherever torch
runs; on a CPU it is a smoke test of the same code.

For every architecture and every combination of `--amp`, `--compile` and `--channels-last`, on the first
`--images` training images of Fashion-MNIST (resized to the preset's own input size), batch 64:
- joint: 2 epochs; the second epoch's training time is kept (the first carries warm-up: cuDNN autotuning,
  allocator growth);
- drmgf: 4 epochs with the switch after epoch 2, at the method's defaults otherwise: epoch 2 is an epoch of
  gated exit passes (dynamic routes), epoch 4 one of plain exit passes; both are kept (the first epoch of
  each kind carries warm-up, and with `--compile` the compilation of that kind's graphs).
Each DR-MGF epoch is reported as a multiple of joint's epoch under the same settings, next to T + 1, and
the gated epoch over the plain one is the gated forward's own price. DR-MGF's first epoch is reported
too: with `--compile` it carries the compilation.

    python benchmarks/train_speed.py --device cuda --archs msdnet-tiny,msdnet-cifar10 --amp off,bf16,fp16 \
        --compile off,default,reduce-overhead
    OMP_NUM_THREADS=1 python benchmarks/train_speed.py --device cpu --archs msdnet-tiny --amp off \
        --compile off,default --channels-last off

Writes the table to `--out` (default `benchmarks/results/train_speed_<device>.md`) and prints it.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fashion-mnist.npz"


def _train(
    args: argparse.Namespace,
    arch: str,
    method: str,
    epochs: int,
    amp: str,
    channels_last: bool,
    compile_mode: str,
    **options: Any,
):
    from anytime.models import create
    from anytime.training.config import TrainConfig
    from anytime.training.trainer import train

    # The trainer sizes a model to the data (28x28 here); each preset is timed at its own input size instead.
    size = tuple(create(arch).spec.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            arch=arch, data=f"npz:{args.data}", epochs=epochs, out=str(Path(tmp) / "run"), method=method,
            method_options=options, model_options={"image_size": size},
            batch_size=args.batch_size, device=args.device, val_size=args.val_size, train_limit=args.images,
            amp=amp, channels_last=channels_last, compile=compile_mode,
        )  # fmt: skip
        result = train(config)
    return [float(row["train_time_s"]) for row in result.history], result


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for arch in args.archs:
        for amp in args.amp:
            for compile_mode in args.compile:
                for channels_last in args.channels_last:
                    joint, _ = _train(args, arch, "joint", 2, amp, channels_last, compile_mode)
                    drmgf, result = _train(args, arch, "drmgf", 4, amp, channels_last, compile_mode, switch_epoch=2)
                    exits = len(result.val_accuracy)
                    rows.append(
                        {
                            "arch": arch,
                            "amp": amp,
                            "compile": compile_mode,
                            "channels_last": channels_last,
                            "exits": exits,
                            "joint_s": joint[1],
                            "gated_s": drmgf[1],
                            "plain_s": drmgf[3],
                            "drmgf_first_s": drmgf[0],
                        }
                    )
                    r = rows[-1]
                    print(
                        f"{arch} amp={amp} compile={compile_mode} channels_last={channels_last}: joint "
                        f"{r['joint_s']:.2f}s, DR-MGF gated {r['gated_s']:.2f}s ({r['gated_s'] / r['joint_s']:.2f}x), "
                        f"plain {r['plain_s']:.2f}s ({r['plain_s'] / r['joint_s']:.2f}x), first "
                        f"{r['drmgf_first_s']:.2f}s, T + 1 = {exits + 1}",
                        flush=True,
                    )
    return rows


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    import torch

    lines = [
        "# Training time per epoch: joint and DR-MGF under the speed options",
        "",
        f"Generated by `benchmarks/train_speed.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{device_name(args.device)}, torch {torch.__version__}; {args.images} Fashion-MNIST training images, "
        f"batch {args.batch_size} ({args.images // args.batch_size} steps an epoch), every number from one run.",
        "",
        "| arch | amp | compile | channels_last | joint epoch (s) | DR-MGF gated epoch (s) | × joint "
        "| DR-MGF plain epoch (s) | × joint | gated / plain | T + 1 | DR-MGF first epoch (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['amp']} | {r['compile']} | {'on' if r['channels_last'] else 'off'} | "
            f"{r['joint_s']:.2f} | {r['gated_s']:.2f} | {r['gated_s'] / r['joint_s']:.2f} | {r['plain_s']:.2f} | "
            f"{r['plain_s'] / r['joint_s']:.2f} | {r['gated_s'] / r['plain_s']:.2f} | {r['exits'] + 1} | "
            f"{r['drmgf_first_s']:.2f} |"
        )
    lines += [
        "",
        "Joint: the second of 2 epochs. DR-MGF (`-m switch_epoch=2`, defaults otherwise: 8-step exit passes): "
        "epoch 2 of 4 (gated exit passes, dynamic routes) and epoch 4 (plain exit passes). An epoch's time is "
        "the trainer's `train_time_s` (training phases only, no evaluation). `compile`: `anytime train --compile` "
        "(torch.compile of the model, and of DR-MGF's gated forward and fused network, each compiled on first use: "
        "the first gated and the first plain epoch carry the compilation; the first is reported).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--archs", type=lambda s: s.split(","), default=["msdnet-tiny", "msdnet-cifar10"])
    p.add_argument("--amp", type=lambda s: s.split(","), default=["off", "bf16"])
    p.add_argument("--compile", type=lambda s: s.split(","), default=["off", "default"])
    p.add_argument(
        "--channels-last",
        type=lambda s: [{"on": True, "off": False}[v] for v in s.split(",")],
        default=[False, True],
        help="off, on or off,on",
    )
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from anytime.fileio import atomic_write_text

    args = parse_args(argv)
    text = report(args, measure(args))
    out = Path(args.out or REPO / "benchmarks" / "results" / f"train_speed_{args.device.split(':')[0]}.md")
    atomic_write_text(out, text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
