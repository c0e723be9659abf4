"""Every training method stays stable on every SDN preset at the paper's lr 0.1 (through the real Trainer).

SDN backbones at lr 0.1 need the SDN ramp of the internal exits' loss weights (`--exit-weights auto`
picks it for SDN presets): with constant weights DR-MGF's exit passes blow the network up within a few
steps. Each case runs the first epoch of the paper's 100-epoch schedule (so the ramp has its epoch-1
weights) for 2 steps per pass on 4-image batches of 32x32 grey textures, and stops after that epoch.

Stable means: no non-finite loss (the trainer raises TrainingError), finite parameters after the epoch,
and an epoch loss within `BLOWUP` times the loss of a uniform guess. A run that diverges does not always
reach inf in 2 steps, but its loss is then orders of magnitude above chance (see the negative case).

CI cost: the wide presets (sdn-vgg16, sdn-wrn32-4, sdn-mobilenet) run with their channel widths divided
by 8 (widen factor 1 for the WRN): same depth, same exit positions, same default exit weighting, a
fraction of the convolution work. sdn-resnet56 (narrow already; its cost is its depth) and sdn-tiny run
as they are.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from anytime.errors import ConfigError, TrainingError
from anytime.training.config import TrainConfig
from anytime.training.losses import exit_weights
from anytime.training.methods import list_methods
from anytime.training.trainer import Trainer, train

NUM_CLASSES = 4
BLOWUP = 30.0  # healthy first epochs stay within a few times chance; diverging ones go past 1000x

_VGG16 = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_MOBILENET = (64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024)
PRESETS: dict[str, dict] = {
    "sdn-vgg16": {"channels": tuple(c // 8 for c in _VGG16)},
    "sdn-resnet56": {},
    "sdn-wrn32-4": {"widen_factor": 1},
    "sdn-mobilenet": {"cfg": tuple((c[0] // 8, c[1]) if isinstance(c, tuple) else c // 8 for c in _MOBILENET)},
    "sdn-tiny": {},
}


def write_textures_npz(path: Path, size: int = 32, n_train: int = 24, n_test: int = 8, seed: int = 0) -> Path:
    """Grey size x size textures of 4 classes (stripes both ways, checker, flat) under uniform noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    patterns = np.stack([(yy // 2) % 2, (xx // 2) % 2, ((yy // 2) + (xx // 2)) % 2, np.ones((size, size))])

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, NUM_CLASSES, n)
        return (patterns[y] * 150 + rng.integers(0, 80, (n, size, size))).astype(np.uint8), y

    (x_train, y_train), (x_test, y_test) = make(n_train), make(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture(scope="module")
def textures(tmp_path_factory) -> Path:
    return write_textures_npz(tmp_path_factory.mktemp("sdn") / "textures32.npz")


class FirstEpochDone(Exception):
    """Raised by the epoch hook: the test needs only the first epoch of the 100-epoch schedule."""


def first_epoch(data: Path, out: Path, arch: str, method: str, **overrides) -> tuple[dict, float]:
    """Train the first epoch; return its results row and the loss of a uniform guess under its weights."""
    config = TrainConfig(
        arch=arch, data=f"npz:{data}", method=method, epochs=100, out=str(out), lr=0.1,
        model_options=PRESETS[arch], batch_size=4, train_limit=8, val_size=4, eval_batch_size=8,
        device="cpu", **overrides,
    )  # fmt: skip
    seen: dict = {}

    def stop(trainer: Trainer, epoch: int, row: dict) -> None:
        seen["row"] = row
        seen["finite_params"] = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
        weights = exit_weights(trainer.exit_weighting, trainer.num_exits, epoch, trainer.epochs)
        seen["chance_loss"] = sum(weights) * math.log(NUM_CLASSES)
        raise FirstEpochDone

    with pytest.raises(FirstEpochDone):
        train(config, epoch_hook=stop)
    assert seen["finite_params"], f"{arch} {method}: parameters not finite after the first epoch"
    return seen["row"], seen["chance_loss"]


@pytest.mark.parametrize("method", list_methods())
@pytest.mark.parametrize("arch", list(PRESETS))
def test_first_epoch_at_lr_0_1_stays_finite(textures, tmp_path, arch, method):
    row, chance = first_epoch(textures, tmp_path / "run", arch, method)
    loss = row["loss"]
    assert math.isfinite(loss) and loss < BLOWUP * chance, (
        f"{arch} {method}: first-epoch loss {loss:.4g} is {loss / chance:.1f}x the uniform guess ({chance:.3g})"
    )


def test_constant_exit_weights_make_drmgf_diverge_on_sdn_resnet56(textures, tmp_path):
    """The negative case: the same run without the SDN ramp blows up, so the check above can fail."""
    try:
        row, chance = first_epoch(textures, tmp_path / "run", "sdn-resnet56", "drmgf", exit_weights="constant")
    except TrainingError as exc:  # non-finite loss: diverged outright
        assert "non-finite loss" in str(exc)
        return
    assert not row["loss"] < BLOWUP * chance, f"loss {row['loss']:.4g} vs uniform guess {chance:.3g}"


def test_sdn_vgg16_refuses_images_below_32_pixels(tmp_path):
    data = write_textures_npz(tmp_path / "textures28.npz", size=28)
    config = TrainConfig(arch="sdn-vgg16", data=f"npz:{data}", epochs=1, out=str(tmp_path / "run"),
                         batch_size=4, val_size=4, device="cpu")  # fmt: skip
    with pytest.raises(ConfigError, match=r"image_size \(28, 28\) is too small for VGG's 5 max-pools; use >= 32"):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()
