"""Budgeted early exit on ONNX Runtime against the last exit's full graph.

Two steps, so that the measurement runs without torch:

  # 1. (torch) train msdnet-tiny briefly on Fashion-MNIST and export a bundle with exit_K.onnx
  python benchmarks/runtime_budget.py build --data ../shared/data/fashion-mnist.npz --out bundles/bench-fm
  # 2. (onnxruntime, numpy only) measure and write the report
  python benchmarks/runtime_budget.py measure --bundle bundles/bench-fm --data ../shared/data/fashion-mnist.npz \
      --out benchmarks/results/runtime_budget.md

`measure`, in one run on one machine, for budgets of 25/50/75% of the full network and batch sizes 1 and
64: throughput of budgeted early exit and of the last exit's single graph, the realised speedup divided
by the ideal speedup (full cost / realised average cost), where the time goes (per stage, and the Python
work between session runs), and test accuracy of the MSDNet geometric policy against the searched one
at equal average cost.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FM_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# ----------------------------------------------------------------------------------------------- build


def build(args: argparse.Namespace) -> None:
    """Train msdnet-tiny for a few epochs (all exits' losses summed) and export a bundle."""
    import torch

    from anytime.models import create

    spec = importlib.util.spec_from_file_location("bundle_writer", ROOT / "tests" / "conftest.py")
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)  # the test-suite bundle writer (stage graphs + exit_K.onnx)

    data = np.load(args.data)
    x_all, y_all = data["x_train"][..., None], data["y_train"].astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y_all))
    val_idx, train_idx = order[: args.val], order[args.val :]
    mean, std = [float(x_all[train_idx].mean() / 255)], [float(x_all[train_idx].std() / 255)]
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    torch.manual_seed(0)
    model = create(args.arch, num_classes=10, in_channels=1, image_size=28).to(device)
    xt = writer._normalise(x_all[train_idx], mean, std).to(device)
    yt = torch.from_numpy(y_all[train_idx]).to(device)
    steps_per_epoch = len(yt) // args.batch
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=args.epochs * steps_per_epoch)
    t0 = time.time()
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(yt), device=device)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch : (i + 1) * args.batch]
            xb = xt[idx]
            if torch.rand(()) < 0.5:
                xb = xb.flip(3)
            loss = sum(torch.nn.functional.cross_entropy(o, yt[idx]) for o in model(xb))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item() / model.num_exits:.3f} ({time.time() - t0:.0f} s)", flush=True)
    model = model.cpu().eval()
    out = writer.write_test_bundle(model, Path(args.out), x_all[val_idx], y_all[val_idx], FM_CLASSES, mean, std,
                                   full_exits=(model.num_exits,))
    print(f"bundle written to {out}")


# --------------------------------------------------------------------------------------------- measure


def _machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def _time_full(session, x: np.ndarray, batch: int, out_name: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    runs = 0
    for i in range(0, len(x), batch):
        session.run([out_name], {"image": x[i : i + batch]})
        runs += 1
    return time.perf_counter() - t0, runs


def _time_early(executor, x: np.ndarray, batch: int, thresholds: np.ndarray):
    stage_s = np.zeros(executor.num_exits)
    rows = np.zeros(executor.num_exits, dtype=np.int64)
    host_s, batches, cost = 0.0, 0, 0.0
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        _, _, _, trace = executor.run_early_exit(x[i : i + batch], thresholds)
        k = len(trace.stage_seconds)
        stage_s[:k] += trace.stage_seconds
        rows[:k] += trace.rows_per_stage
        host_s += trace.overhead_seconds
        cost += trace.total_cost
        batches += 1
    wall = time.perf_counter() - t0
    return {"wall": wall, "stage_s": stage_s, "rows": rows, "host_s": host_s, "batches": batches, "avg_cost": cost / len(x)}


def measure(args: argparse.Namespace) -> None:
    import onnxruntime as ort

    import anytime
    from anytime.runtime.budget import format_cost
    from anytime.runtime.calibration import ValidationData, first_exit, softmax_confidence

    data = np.load(args.data)
    x_u8, y_test = data["x_test"][..., None], data["y_test"].astype(np.int64)
    lines: list[str] = []
    emit = lines.append
    emit("# Budgeted early exit vs the full graph (ONNX Runtime)\n")
    emit(f"Generated by `benchmarks/runtime_budget.py measure` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n")
    emit(f"- Machine: {_machine()}")
    emit(f"- onnxruntime {ort.__version__}, numpy {np.__version__}; available providers: {ort.get_available_providers()}")

    model = anytime.load(args.bundle, device=args.device)  # all cores for the test logits
    b = model.bundle
    full_entry = [e for e in b.manifest.get("full_exits", []) if int(e["exit"]) == b.num_exits]
    if not full_entry:
        sys.exit(f"{args.bundle} has no exit_{b.num_exits}.onnx (export with full exits) to compare against")
    conv = model.cost_convention
    costs = model.exit_costs
    emit(f"- Bundle: `{b.arch}` ({b.path.name}), {b.num_exits} exits, cumulative cost per exit ({conv}): "
         + ", ".join(format_cost(c) for c in costs)
         + "; validation accuracy per exit: " + ", ".join(f"{100 * s.val_accuracy:.1f}%" for s in b.stages if s.val_accuracy is not None))
    emit(f"- Provenance: {b.manifest.get('provenance', {}).get('method', '?')}; calibration on {b.manifest['calibration']['count']} validation images; "
         f"test: Fashion-MNIST test split, {len(y_test)} images.")
    emit(f"- Timings: best of {args.repeats} passes after a warm-up; inputs preprocessed beforehand (decode and normalise are "
         f"reported separately); batch 64 uses the first {min(args.images, len(y_test))} test images, batch 1 the first {args.batch1_images}.\n")

    x = model.preprocessor.normalise(x_u8)
    t0 = time.perf_counter()
    model.preprocessor.normalise(x_u8)
    norm_us = 1e6 * (time.perf_counter() - t0) / len(x)

    # ---- accuracy at equal average cost: geometric vs searched (test logits once, policies simulated;
    # tests/test_runtime_predict.py checks that real early exit gives exactly these answers) ----
    test_logits = model.run_all_exits(x_u8, batch_size=500)
    test = ValidationData(test_logits, y_test, costs)
    val = model.validation_data()

    for threads in args.threads:
        model = anytime.load(args.bundle, device=args.device, threads=threads)
        ex = model.executor
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        full = ort.InferenceSession(str(b.file(full_entry[0]["file"])), sess_options=options, providers=model.providers)
        full_out = full.get_outputs()[0].name
        emit(f"\n## intra-op threads = {threads or 'onnxruntime default'}, providers {model.providers}\n")
        emit("| batch | run | realised cost | img/s | realised speedup | ideal speedup (cost) | **realised / ideal** | "
             "stage-time speedup | realised / stage-time | host work per batch | host share |")
        emit("|---|---|---|---|---|---|---|---|---|---|---|")
        where: list[str] = []
        for batch in (1, 64):
            xs = x[: args.batch1_images] if batch == 1 else x[: args.images]
            _time_full(full, xs[: 4 * batch], batch, full_out)  # warm-up
            full_s = min(_time_full(full, xs, batch, full_out)[0] for _ in range(args.repeats))
            emit(f"| {batch} | full graph exit_{b.num_exits}.onnx | {format_cost(costs[-1])} (100%) | {len(xs) / full_s:,.0f} | 1.00× | 1.00× | | | | | |")
            # Every sample through every stage: the price of splitting the graph (boundaries, earlier heads),
            # and each stage's time per row at this batch size.
            never = np.full(ex.num_exits, np.inf, dtype=np.float32)
            _time_early(ex, xs[: 4 * batch], batch, never)
            chain = min((_time_early(ex, xs, batch, never) for _ in range(args.repeats)), key=lambda d: d["wall"])
            stage_us = chain["stage_s"] / len(xs)  # seconds per row per stage, full batches
            rows_out = [("stage chain, exit=" + str(b.num_exits), chain)]
            for budget in args.budgets:
                try:
                    pols = model.calibrate_all(budget)
                except anytime.AnytimeError:
                    emit(f"| {batch} | {budget}: infeasible, the first exit alone costs {100 * costs[0] / costs[-1]:.1f}% of the full network | | | | | | | | | |")
                    continue
                chosen = [("geometric", pols["geometric"])]
                if pols["best"] is not pols["geometric"]:
                    chosen.append((f"{pols['best'].method} (default)", pols["best"]))
                for label, policy in chosen:
                    th = policy.threshold_array()
                    _time_early(ex, xs[: 4 * batch], batch, th)
                    r = min((_time_early(ex, xs, batch, th) for _ in range(args.repeats)), key=lambda d: d["wall"])
                    rows_out.append((f"{budget} {label}", r))
                    if budget == args.budgets[len(args.budgets) // 2] and label == "geometric":
                        mid = (budget, r)
            for label, r in rows_out:
                realised = full_s / r["wall"]
                ideal = costs[-1] / r["avg_cost"]
                predicted = full_s / float((r["rows"] * stage_us).sum())
                host = r["wall"] - r["stage_s"].sum()
                emit(f"| {batch} | {label} | {format_cost(r['avg_cost'])} ({100 * r['avg_cost'] / costs[-1]:.1f}%) | {len(xs) / r['wall']:,.0f} | "
                     f"{realised:.2f}× | {ideal:.2f}× | **{realised / ideal:.2f}** | {predicted:.2f}× | {realised / predicted:.2f} | "
                     f"{1e3 * host / r['batches']:.3f} ms | {100 * host / r['wall']:.1f}% |")
            budget, r = mid
            where.append(f"\nBatch {batch}, budget {budget} (geometric): the full graph takes {1e6 * full_s / len(xs):.1f} µs per image.\n")
            where.append("| stage | cost share | time share (all rows, chain) | µs per row, all rows | rows run under the budget | µs per row under the budget |")
            where.append("|---|---|---|---|---|---|")
            prev = 0.0
            for k in range(ex.num_exits):
                share = (costs[k] - prev) / costs[-1]
                prev = costs[k]
                us_row = 1e6 * r["stage_s"][k] / max(r["rows"][k], 1)
                where.append(f"| {k + 1} | {100 * share:.1f}% | {100 * stage_us[k] * len(xs) / full_s:.1f}% of the full graph | "
                             f"{1e6 * stage_us[k]:.1f} | {r['rows'][k]} | {us_row:.1f} |")
            other = r["wall"] - r["stage_s"].sum() - r["host_s"]
            where.append(f"\nHost work under the budget: {1e3 * r['host_s']:.1f} ms between session runs (softmax, masks, compaction) + "
                         f"{1e3 * other:.1f} ms loop and slicing, of {1e3 * r['wall']:.0f} ms wall ({r['batches']} batches).")
        lines.extend(where)

    emit("\n## Accuracy at equal average cost: MSDNet geometric policy vs searched thresholds\n")
    emit("Both fitted on the bundle's validation split for the same budget; test cost and accuracy from the test split "
         "(10,000 images). The runtime's default is whichever is better on validation.\n")
    emit("The searched policy may spend less than the budget when more compute does not pay on validation; the last "
         "columns therefore also give the geometric policy solved for the searched policy's own validation cost "
         "(equal average cost).\n")
    emit("| budget | geometric: val acc | val cost | test acc | test cost | search: val acc | val cost | test acc | test cost | default | geometric at search's cost: val acc | test acc | test cost |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for pct in (20, 25, 30, 40, 45, 50, 60, 75, 90):
        budget = f"{pct}%"
        try:
            pols = model.calibrate_all(budget)
        except anytime.AnytimeError:
            continue
        cells = []
        for name in ("geometric", "search"):
            p = pols[name]
            tc, ta, _ = test.evaluate(p.threshold_array())
            cells.append(f"{100 * p.expected_accuracy:.2f}% | {100 * p.expected_cost / costs[-1]:.1f}% | {100 * ta:.2f}% | {100 * tc / costs[-1]:.1f}%")
        same = model.calibrate_all(max(pols["search"].expected_cost, float(costs[0])))["geometric"]
        tc, ta, _ = test.evaluate(same.threshold_array())
        emit(f"| {budget} | " + " | ".join(cells) + f" | {pols['best'].method} | {100 * same.expected_accuracy:.2f}% | "
             f"{100 * ta:.2f}% | {100 * tc / costs[-1]:.1f}% |")
    per_exit = ", ".join(f"exit {k + 1} {100 * test.correct[k].mean():.2f}%" for k in range(test.num_exits))
    emit(f"\nTest accuracy of each exit alone: {per_exit}. Normalising a uint8 batch costs {norm_us:.2f} µs per image "
         "(decoding PNG files in `serve` comes on top).")
    _ = (first_exit, softmax_confidence, val)
    assert "torch" not in sys.modules, "the measurement must not import torch"
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    pb = sub.add_parser("build", help="train msdnet-tiny briefly and export a bundle (needs torch)")
    pb.add_argument("--data", default=str(ROOT.parent / "shared/data/fashion-mnist.npz"))
    pb.add_argument("--out", default=str(ROOT / "bundles" / "bench-fm"))
    pb.add_argument("--arch", default="msdnet-tiny")
    pb.add_argument("--epochs", type=int, default=3)
    pb.add_argument("--batch", type=int, default=128)
    pb.add_argument("--val", type=int, default=5000)
    pb.add_argument("--device", default="auto")
    pm = sub.add_parser("measure", help="benchmark a bundle (onnxruntime only)")
    pm.add_argument("--bundle", default=str(ROOT / "bundles" / "bench-fm"))
    pm.add_argument("--data", default=str(ROOT.parent / "shared/data/fashion-mnist.npz"))
    pm.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtime_budget.md"))
    pm.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",")], default=[1])
    pm.add_argument("--device", default="auto")
    pm.add_argument("--repeats", type=int, default=3)
    pm.add_argument("--batch1-images", type=int, default=2000)
    pm.add_argument("--images", type=int, default=10000, help="test images timed at batch 64")
    pm.add_argument("--budgets", type=lambda s: s.split(","), default=["25%", "50%", "75%"])
    args = parser.parse_args()
    build(args) if args.cmd == "build" else measure(args)


if __name__ == "__main__":
    main()
