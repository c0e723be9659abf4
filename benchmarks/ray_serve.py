"""`anytime serve` in one process against 2 Ray workers on this machine, on the same inputs.

    python benchmarks/ray_serve.py --data ../shared/data/fashion-mnist.npz --images 4000 \\
        --out benchmarks/results/ray_serve.md

Writes `--images` Fashion-MNIST test images as PNG files into a temporary folder, then, in one run:
Ray's start-up (a local cluster of `--workers` CPUs), one process (the embedded default model,
onnxruntime's default threads, as `anytime serve` runs), the Ray job (`anytime serve --ray`'s code path:
`--workers` actors of one CPU each, each decoding and predicting its share), and the one process again
(the two one-process runs bracket the Ray run, so a change of load on the machine shows). Checks that
both paths give the same rows. Needs the [ray] extra.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_images(data: Path, count: int, folder: Path) -> None:
    from anytime.formats.bundle import read_bundle

    classes = read_bundle(None).classes
    with np.load(data) as arrays:
        x, y = arrays["x_test"][:count], arrays["y_test"][:count]
    for i in range(len(x)):
        target = folder / classes[int(y[i])]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i].reshape(x[i].shape[0], x[i].shape[1])).save(target / f"test{i:05d}.png")


def one_process(model, policy, folder: Path) -> tuple[float, list[dict]]:
    from anytime.runtime.inputs import expand_paths

    t0 = time.perf_counter()
    rows = [r for part in model.predict_batches(expand_paths([str(folder)]), policy=policy) for r in part.to_rows()]
    return time.perf_counter() - t0, rows


def on_ray(model, policy, folder: Path, workers: int) -> tuple[float, float, int, list[dict]]:
    """(seconds of the whole job, seconds until the first rows came back, those rows, all rows)."""
    from anytime.ray import stream_predictions

    t0 = time.perf_counter()
    rows: list[dict] = []
    first_s, first_rows = 0.0, 0
    for part in stream_predictions(model, policy, [str(folder)], workers=workers):
        rows += part.to_rows()
        if not first_rows:
            first_s, first_rows = time.perf_counter() - t0, len(rows)
    return time.perf_counter() - t0, first_s, first_rows, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fashion-mnist.npz"))
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_serve.md"))
    args = parser.parse_args()

    import ray

    import anytime
    from anytime.ray import connect

    load = os.getloadavg()
    folder = Path(tempfile.mkdtemp(prefix="anytime-ray-bench-"))
    try:
        write_images(Path(args.data), args.images, folder)
        model = anytime.load()
        policy = model.calibrate(args.budget)
        t0 = time.perf_counter()
        connect("local")
        startup = time.perf_counter() - t0
        first_s, single_rows = one_process(model, policy, folder)
        ray_s, first_s_ray, first_rows, ray_rows = on_ray(model, policy, folder, args.workers)
        second_s, _ = one_process(model, policy, folder)
        ray.shutdown()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert len(ray_rows) == len(single_rows) == args.images, (len(ray_rows), len(single_rows))
    same = ray_rows == single_rows
    differ = [
        k
        for k in ("path", "label", "confidence", "exit", "cost")
        if [r[k] for r in ray_rows] != [r[k] for r in single_rows]
    ]
    steady = (n_after := len(ray_rows) - first_rows) / max(ray_s - first_s_ray, 1e-9)
    n = args.images
    single_s = (first_s + second_s) / 2
    table = [
        "| path | seconds | images/s | vs one process |",
        "|---|---|---|---|",
        f"| one process (before the Ray run) | {first_s:.2f} | {n / first_s:,.0f} | |",
        f"| {args.workers} Ray workers (job, actor start-up included) | {ray_s:.2f} | {n / ray_s:,.0f} | "
        f"{single_s / ray_s:.2f}× |",
        f"| {args.workers} Ray workers, after the first block came back ({n_after} rows; an upper bound) | "
        f"{ray_s - first_s_ray:.2f} | "
        f"{steady:,.0f} | {steady / (n / single_s):.2f}× |",
        f"| one process (after the Ray run) | {second_s:.2f} | {n / second_s:,.0f} | |",
        f"| Ray start-up (`ray.init`, local cluster of {args.workers} CPUs) | {startup:.2f} | | |",
    ]
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, ray {ray.__version__}"
    )
    text = "\n".join(
        [
            "# One process against Ray workers (`benchmarks/ray_serve.py`)",
            "",
            f"{n} Fashion-MNIST test images as PNG files, the embedded default model (msdnet-tiny), budget "
            f"{args.budget}, {machine}. Same rows from both paths: "
            + ("yes" if same else f"NO (columns that differ: {', '.join(differ)})")
            + ". The ratio is the "
            "one-process time (mean of the two runs around the Ray run) over the Ray job's. The machine was "
            f"shared with other jobs (load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} over 1/5/15 min at "
            "the start), so absolute numbers are low and noisy; the side-by-side ratio is what this measures. "
            "The job includes starting the actors and loading the bundle in each; the row after it counts only "
            "the rows after the first block and the time after it, which overstates the steady rate (the other "
            "worker's block was already under way).",
            "",
            *table,
            "",
        ]
    )
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
