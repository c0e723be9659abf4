"""Shared fixtures: a small synthetic image task and bundles exported from a briefly trained model.

`pattern_bundle` goes through the real exporter (anytime.export.export_bundle). Tests may use torch; the
runtime under test never does.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

# The verbs default to onnxruntime's shared thread pool, which is process-wide and once made cannot be undone:
# every later session of the process would run on it. The verbs run in this process, so keep them on per-session
# pools; test_thread_pool.py checks the shared pool, and the verbs' default, in processes of their own.
os.environ["ANYTIME_THREAD_POOL"] = "session"

PATTERN_CLASSES = ["horizontal", "vertical", "checker/board", "disc"]
PATTERN_SIZE = 16
PATTERN_MEAN, PATTERN_STD = 0.45, 0.30


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb(width: int = 8000, height: int = 8000) -> bytes:
    """A small PNG whose header claims 64 MP (a few rows of zeros follow): pixels are never decoded."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    rows = zlib.compress(b"\x00" * ((width + 1) * 4), 9)
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def broken_image_files(good: np.ndarray) -> dict[str, bytes]:
    """One unreadable file of each kind serving must turn into an error row (`good`: an image to truncate)."""
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(good).save(png, format="PNG")
    return {
        "truncated.png": png.getvalue()[: len(png.getvalue()) // 2],
        "empty.png": b"",
        "notes.png": b"this is a text file, not an image\n",
        "bomb.png": decompression_bomb(),
    }


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


def _normalise(x_uint8: np.ndarray, mean: list[float], std: list[float]):
    import torch

    x = torch.from_numpy(x_uint8).float().div(255.0).permute(0, 3, 1, 2)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


def train_pattern_convnet(steps: int = 80, seed: int = 0, widths=(8, 12, 16, 16)):
    """test-convnet (4 exits) trained briefly on the pattern task with the summed loss of all exits."""
    import torch

    from anytime.models import create

    torch.manual_seed(seed)
    model = create(
        "test-convnet", num_classes=len(PATTERN_CLASSES), in_channels=1, image_size=PATTERN_SIZE, widths=widths
    )
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
    from anytime.formats.preprocessing import PreprocessingSpec
    from anytime.models import save_model

    root.mkdir(parents=True, exist_ok=True)
    x_train, y_train = make_pattern_images(val_size + 200, seed=1)
    x_test, y_test = make_pattern_images(8, seed=3)
    npz = root / "patterns.npz"
    np.savez(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    dataset = open_dataset(f"npz:{npz}")
    _, _, record = split_train_val(dataset, val_size=val_size, seed=0)
    run = root / "run"
    save_model(
        model,
        run,
        PreprocessingSpec.for_model(1, (PATTERN_SIZE, PATTERN_SIZE), [PATTERN_MEAN], [PATTERN_STD]),
        PATTERN_CLASSES,
    )
    (run / "config.json").write_text(
        json.dumps({"arch": model.spec.arch, "data": dataset.spec, "method": "joint", "epochs": 0})
    )
    (run / "split.json").write_text(json.dumps(record))
    export_bundle(run, root / "bundle", full_exits=True, progress=False)
    return root / "bundle"


PATTERN_BUNDLE = Path(__file__).parent / "data" / "pattern-bundle"
HAS_TORCH = importlib.util.find_spec("torch") is not None


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Without torch (the serving environment .ci/run also tests), collect only the modules marked
    `pytestmark = pytest.mark.runtime`; the others import torch at module level."""
    if HAS_TORCH or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    return "pytestmark = pytest.mark.runtime" not in collection_path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def pattern_bundle(tmp_path_factory) -> Path:
    """A 4-exit, 1-channel 16×16, 4-class bundle with full-exit graphs and 600 validation images for
    calibration, written by the real exporter (`python tests/data/make_pattern_bundle.py`) and committed,
    so the runtime tests also run in a serving environment without torch (and prove that bundles written
    by an earlier anytime still load). A copy, so no test can change the committed files."""
    import shutil

    out = tmp_path_factory.mktemp("bundles") / "patterns"
    shutil.copytree(PATTERN_BUNDLE, out)
    return out


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
    try:
        import torch
    except ImportError:  # the serving environment of .ci/run: runtime tests only
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
