"""Real photo collections: images of different sizes and aspect ratios, EXIF orientation, 16-bit greyscale.

One decoding and preprocessing path (anytime.formats.preprocessing) serves training, export and serving;
these tests go through train -> export -> serve -> eval on such a folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

import anytime
from anytime.data import open_dataset
from anytime.formats.preprocessing import PreprocessingSpec, Preprocessor, decode_file

ORIENTATION = 0x0112


def _photo(rng: np.random.Generator, label: int, h: int, w: int) -> np.ndarray:
    """A colour image whose class is which half is bright (left/right), at any size."""
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    if label == 0:
        img[:, : w // 2] += 150
    else:
        img[:, w // 2 :] += 150
    return img


def make_photo_folder(root: Path, per_class: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (64, 48), (40, 40), (90, 60), (36, 100), (120, 80)]
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for label, name in enumerate(("left", "right")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = sizes[(i + label) % len(sizes)]
                img = Image.fromarray(_photo(rng, label, h, w))
                if i % 3 == 0:
                    img.save(folder / f"{i}.jpg", quality=95)
                else:
                    img.save(folder / f"{i}.png")
    return root


def test_exif_orientation_is_applied_when_decoding(tmp_path):
    rng = np.random.default_rng(1)
    upright = _photo(rng, 0, 30, 50)  # bright left half, 30 high, 50 wide
    # Stored as a camera does: pixels rotated, with a tag saying "rotate 90° clockwise to display".
    stored = Image.fromarray(np.rot90(upright, k=1).copy())
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    stored.save(tmp_path / "tagged.png", exif=exif)  # lossless, so the comparison is exact
    with Image.open(tmp_path / "tagged.png") as stored_file:
        assert stored_file.size == (30, 50)  # stored sideways: 30 wide, 50 high
    decoded = decode_file(tmp_path / "tagged.png", "RGB")
    np.testing.assert_array_equal(decoded, upright)
    spec = PreprocessingSpec(3, 30, 50, (0.5,) * 3, (0.25,) * 3, resize=None)
    served = Preprocessor(spec).to_array(tmp_path / "tagged.png")
    np.testing.assert_array_equal(served, decoded)  # serving decodes the same way
    assert "EXIF" in " ".join(spec.steps())


def test_sixteen_bit_greyscale_is_scaled_to_eight_bit(tmp_path):
    rng = np.random.default_rng(2)
    eight = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "wide.png")
    with Image.open(tmp_path / "wide.png") as wide_file:
        assert wide_file.mode.startswith("I;16")
    np.testing.assert_array_equal(decode_file(tmp_path / "wide.png", "L")[..., 0], eight)
    spec = PreprocessingSpec(1, 20, 24, (0.5,), (0.25,), resize=None)
    np.testing.assert_array_equal(Preprocessor(spec).to_array(tmp_path / "wide.png")[..., 0], eight)


def test_mixed_size_photo_folder_trains_exports_serves_and_evaluates(tmp_path):
    from anytime.export import export_bundle
    from anytime.runtime.evaluation import evaluate_model
    from anytime.training import TrainConfig, train

    data = make_photo_folder(tmp_path / "photos")
    ds = open_dataset(f"imagefolder:{data}")
    assert ds.info.channels == 3 and ds.info.num_classes == 2
    run = tmp_path / "run"
    result = train(TrainConfig(
        arch="test-convnet", data=f"imagefolder:{data}", method="joint", epochs=3, out=str(run), val_size=16,
        batch_size=16, lr=0.05, device="cpu", model_options={"image_size": 32},
    ))  # fmt: skip
    assert len(result.test_accuracy) == 3
    bundle = tmp_path / "bundle"
    exported = export_bundle(run, bundle)  # used to fail: raw images of different sizes stacked into one batch
    assert exported.manifest["calibration"]["count"] == 16
    assert exported.manifest["input"]["resize"] == 32 and exported.manifest["input"]["exif_orientation"] is True

    model = anytime.load(bundle)
    photos = sorted((data / "test").rglob("*.*"))
    preds = model.predict(photos, budget="exit=3", on_error="record")
    assert len(preds) == len(photos) and all(p.error is None for p in preds)

    from anytime.cli import cli

    out = tmp_path / "preds.jsonl"
    runner = CliRunner()
    res = runner.invoke(
        cli, ["serve", str(bundle), str(data / "test"), "--budget", "exit=3", "-o", str(out)], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(photos) and all(r["error"] is None for r in rows)

    report = evaluate_model(bundle, data=f"imagefolder:{data}", split="test")
    assert report.count == len(photos) and len(report.exits) == 3
