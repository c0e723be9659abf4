"""Shared fixtures: a small synthetic image task and bundles exported from a briefly trained model.

`pattern_bundle` goes through the real exporter (anytime.export.export_bundle). `write_test_bundle` is a
minimal stand-alone writer of the same format (docs/architecture.md), used by benchmarks/runtime_budget.py
to export a model without a run directory. Tests may use torch; the runtime under test never does.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

PATTERN_CLASSES = ["horizontal", "vertical", "checker/board", "disc"]
PATTERN_SIZE = 16
PATTERN_MEAN, PATTERN_STD = 0.45, 0.30


def make_pattern_images(n: int, seed: int = 0, size: int = PATTERN_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(N×size×size×1 uint8 images, labels) of 4 texture classes under noise of varying strength.

    Noise strength is drawn per image, so some images are easy (early exits answer them confidently)
    and some hard (only deeper exits, which average over larger areas, get them right).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    patterns = np.stack(
        [
            (yy // 2) % 2,
            (xx // 2) % 2,
            ((yy // 2) + (xx // 2)) % 2,
            ((yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (size / 3) ** 2),
        ]
    ).astype(np.float32)
    labels = rng.integers(0, len(patterns), n)
    noise = rng.uniform(0.2, 3.2, n).astype(np.float32)
    images = patterns[labels] + noise[:, None, None] * rng.normal(size=(n, size, size)).astype(np.float32)
    pixels = np.clip(images * 110 + 70, 0, 255).round().astype(np.uint8)
    return pixels[..., None], labels.astype(np.int64)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _normalise(x_uint8: np.ndarray, mean: list[float], std: list[float]):
    import torch

    x = torch.from_numpy(x_uint8).float().div(255.0).permute(0, 3, 1, 2)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


def _cumulative_macs(model, x) -> list[int]:
    """Cumulative conv+linear MACs per exit (stages 1..k including heads), via FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    costs, total, state = [], 0, (x[:1],)
    for stage in model.stages:
        with FlopCounterMode(display=False) as counter:
            state, _ = stage(state)
        total += counter.get_total_flops() // 2
        costs.append(int(total))
    return costs


def write_test_bundle(
    model,
    out_dir: Path,
    x_val: np.ndarray,
    y_val: np.ndarray,
    classes: list[str],
    mean: list[float],
    std: list[float],
    color: str = "L",
    full_exits: tuple[int, ...] = (),
    logits_batch: int = 512,
) -> Path:
    """Export a MultiExitNetwork as an anytime bundle (one ONNX graph per stage) with calibration data.

    `full_exits`: 1-based exits that also get a single graph image -> logits (exit_k.onnx).
    """
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    x = _normalise(x_val, mean, std)
    costs = _cumulative_macs(model, x)
    stages_meta = []
    in_names = ["image"]
    state = (x[:2],)

    class StageGraph(torch.nn.Module):
        def __init__(self, stage):
            super().__init__()
            self.stage = stage

        def forward(self, *tensors):
            next_state, logits = self.stage(tuple(tensors))
            return (*next_state, logits)

    with torch.no_grad():
        for k, stage in enumerate(model.stages):
            next_state, _ = stage(state)
            out_names = [f"s{k}_{i}" for i in range(len(next_state))] + [f"logits_{k}"]
            path = out_dir / f"stage_{k}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is fast
                torch.onnx.export(
                    StageGraph(stage),
                    tuple(state),
                    str(path),
                    input_names=in_names,
                    output_names=out_names,
                    dynamic_axes={n: {0: "batch"} for n in in_names + out_names},
                    opset_version=17,
                    dynamo=False,
                )
            stages_meta.append(
                {"index": k, "file": path.name, "inputs": list(in_names), "outputs": out_names,
                 "logits": out_names[-1], "cost": {"macs": costs[k], "msdnet": costs[k]},
                 "params": None, "val_accuracy": None, "sha256": _sha256(path)}
            )
            state, in_names = next_state, out_names[:-1]
        logits = torch.cat([torch.stack(model(x[i : i + logits_batch])) for i in range(0, len(x), logits_batch)], dim=1)
        logits = logits.numpy().astype(np.float32)
        full_meta = []
        for e in full_exits:

            class ExitGraph(torch.nn.Module):
                def __init__(self, net, index):
                    super().__init__()
                    self.net, self.index = net, index

                def forward(self, image):
                    return self.net.forward_until(image, self.index)[-1]

            path = out_dir / f"exit_{e}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(ExitGraph(model, e - 1), (x[:2],), str(path), input_names=["image"],
                                  output_names=[f"logits_{e - 1}"], dynamic_axes={"image": {0: "batch"}, f"logits_{e - 1}": {0: "batch"}},
                                  opset_version=17, dynamo=False)
            full_meta.append({"exit": e, "file": path.name, "inputs": ["image"], "logits": f"logits_{e - 1}", "sha256": _sha256(path)})
    for k, meta in enumerate(stages_meta):
        meta["val_accuracy"] = float((logits[k].argmax(-1) == y_val).mean())
    cal = out_dir / "calibration.npz"
    np.savez(cal, logits=logits, labels=y_val.astype(np.int64), indices=np.arange(len(y_val), dtype=np.int64))
    manifest = {
        "format": "anytime-bundle",
        "format_version": 1,
        "arch": model.spec.arch,
        "num_classes": len(classes),
        "classes": list(classes),
        "input": {"name": "image", "channels": x_val.shape[-1], "height": x_val.shape[1], "width": x_val.shape[2],
                  "mean": list(mean), "std": list(std), "resize": None, "crop": "center",
                  "interpolation": "bilinear", "layout": "NCHW", "dtype": "float32", "color": color},
        "cost_convention": "macs",
        "stages": stages_meta,
        "full_exits": full_meta,
        "calibration": {"file": cal.name, "sha256": _sha256(cal), "split": "validation", "count": int(len(y_val))},
        "provenance": {"run_dir": None, "method": "test-fixture", "epochs": 0, "anytime_version": "0.1.0",
                       "date": "1970-01-01T00:00:00Z", "data": "synthetic:patterns"},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


def train_pattern_convnet(steps: int = 80, seed: int = 0, widths=(8, 12, 16, 16)):
    """test-convnet (4 exits) trained briefly on the pattern task with the summed loss of all exits."""
    import torch

    from anytime.models import create

    torch.manual_seed(seed)
    model = create("test-convnet", num_classes=len(PATTERN_CLASSES), in_channels=1, image_size=PATTERN_SIZE, widths=widths)
    x_np, y_np = make_pattern_images(2048, seed=seed + 100)
    x = _normalise(x_np, [PATTERN_MEAN], [PATTERN_STD])
    y = torch.from_numpy(y_np)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        loss = sum(torch.nn.functional.cross_entropy(o, y[idx]) for o in model(x[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def export_pattern_bundle(root: Path, model, val_size: int = 600) -> Path:
    """Export `model` with the real exporter (anytime.export.export_bundle) from a hand-made run directory.

    The run's dataset is an npz of pattern images (none of them seen in training); its validation split
    of `val_size` images becomes the bundle's calibration data.
    """
    from anytime.data import open_dataset, split_train_val
    from anytime.export import export_bundle
    from anytime.models import Preprocessing, save_model

    root.mkdir(parents=True, exist_ok=True)
    x_train, y_train = make_pattern_images(val_size + 200, seed=1)
    x_test, y_test = make_pattern_images(8, seed=3)
    npz = root / "patterns.npz"
    np.savez(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    dataset = open_dataset(f"npz:{npz}")
    _, _, record = split_train_val(dataset, val_size=val_size, seed=0)
    run = root / "run"
    save_model(model, run, Preprocessing(mean=[PATTERN_MEAN], std=[PATTERN_STD]), PATTERN_CLASSES)
    (run / "config.json").write_text(json.dumps({"arch": model.spec.arch, "data": dataset.spec, "method": "joint", "epochs": 0}))
    (run / "split.json").write_text(json.dumps(record))
    export_bundle(run, root / "bundle", full_exits=True, progress=False)
    return root / "bundle"


@pytest.fixture(scope="session")
def pattern_bundle(tmp_path_factory) -> Path:
    """A 4-exit, 1-channel 16×16, 4-class bundle from the real exporter, 600 validation images for calibration."""
    model = train_pattern_convnet()
    return export_pattern_bundle(tmp_path_factory.mktemp("bundles") / "patterns", model)


@pytest.fixture(scope="session")
def pattern_bundle_exact(pattern_bundle, tmp_path_factory) -> Path:
    """The same bundle with `input.resize` null: images must already be 16×16 (older/third-party bundles)."""
    import shutil

    out = tmp_path_factory.mktemp("bundles") / "patterns-exact"
    shutil.copytree(pattern_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["input"]["resize"] = None
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="session")
def pattern_test_images() -> tuple[np.ndarray, np.ndarray]:
    """300 held-out pattern images (N×16×16×1 uint8) and labels."""
    return make_pattern_images(300, seed=2)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op torch thread for the whole suite.

    The tests run many small ops at batch sizes of 1-64; on a shared 2-core machine two threads spin
    against other processes and cost several times the CPU time of one, and one thread is bit-reproducible.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
