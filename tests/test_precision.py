"""Mixed precision (`--amp`) and channels_last, as far as a CPU can test them: bf16 autocast reaches every
forward pass of a method, fp16 loss scaling is undone before the TorchJD aggregators, the loss scaler's
state survives a resume, and bad options are one clear line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from anytime.cli.train import train as train_command
from anytime.errors import ConfigError
from anytime.training.config import TrainConfig
from anytime.training.precision import Precision
from anytime.training.trainer import Trainer, resume, train


def write_npz(path: Path, n: int = 96, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.integers(0, 80, (n, 12, 12)) + y[:, None, None] * 50).astype(np.uint8)
    np.savez(path, x_train=x, y_train=y, x_test=x[:16], y_test=y[:16])
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    return write_npz(tmp_path / "d.npz")


def config(data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(arch="test-convnet", data=f"npz:{data}", epochs=1, out=str(out), batch_size=16, val_size=16,
                  train_limit=32, lr=0.05, device="cpu")  # fmt: skip
    values.update(kw)
    return TrainConfig(**values)


@pytest.mark.parametrize("method", ["joint", "drmgf"])
def test_bf16_autocast_reaches_every_training_forward_and_stays_finite(data, tmp_path, monkeypatch, method):
    real = Trainer.exit_losses
    dtypes: dict[str, set[torch.dtype]] = {}

    def recording(self, outputs, targets, epoch):
        dtypes.setdefault(self.progress.phase.split()[0], set()).update(o.dtype for o in outputs)
        return real(self, outputs, targets, epoch)

    monkeypatch.setattr(Trainer, "exit_losses", recording)
    result = train(config(data, tmp_path / "run", method=method, amp="bf16"))
    assert math.isfinite(result.history[0]["loss"])
    # joint: "train"; DR-MGF: gated exit passes ("exit") and the meta step's fused network ("fusion")
    expected = {"train"} if method == "joint" else {"exit", "fusion"}
    assert set(dtypes) == expected and all(d == {torch.bfloat16} for d in dtypes.values()), dtypes
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert torch.bfloat16 not in {
        value.dtype for value in saved.values()
    }  # autocast computes in bf16, the weights stay float32


@pytest.mark.parametrize("name", ["pcgrad", "nashmtl"])
def test_fp16_loss_scale_is_divided_out_before_aggregating(name):
    from test_methods import ToyContext

    from anytime.training.methods import create_method

    def grads(precision: Precision) -> dict[str, torch.Tensor]:
        ctx = ToyContext(seed=3)
        ctx.precision = precision
        method = create_method(name)
        method.setup(ctx)
        x, y = ctx.data[0]
        losses = ctx.exit_losses(ctx.model(x), y, 0)
        method.backward(ctx, [precision.scale(loss) for loss in losses], 0)
        return {n: p.grad / precision.loss_scale for n, p in ctx.model.named_parameters()}

    scaled = Precision("fp16")
    assert scaled.loss_scale > 1
    plain, unscaled = grads(Precision()), grads(scaled)
    for n in plain:
        torch.testing.assert_close(unscaled[n], plain[n], rtol=1e-4, atol=1e-7, msg=n)


def test_fp16_resume_restores_the_loss_scaler_and_continues_identically(data, tmp_path):
    from safetensors.torch import load_file

    cfg = dict(method="drmgf", amp="fp16", epochs=3, seed=5)
    reference = Trainer(config(data, tmp_path / "reference", **cfg))
    reference.run()

    class Stop(Exception):
        pass

    def stop_in_third_epoch(trainer, epoch, row):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train(config(data, tmp_path / "killed", **cfg), epoch_hook=stop_in_third_epoch)
    saved = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["precision"]["mode"] == "fp16"
    # 2 epochs x (3 exit passes + fusion) x 2 steps: the growth counter shows the scaler really ran
    assert saved["precision"]["scaler"]["_growth_tracker"] > 0

    resumed = Trainer(config(data, tmp_path / "killed", **cfg), resume=True)
    resumed.run()
    assert resumed.precision.scaler.state_dict() == reference.precision.scaler.state_dict()
    a = load_file(str(tmp_path / "reference" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_channels_last_model_and_batches(data, tmp_path):
    seen = {}

    def inspect(trainer, epoch, row):
        x, _ = next(trainer.train_batches(epoch, "inspect"))
        seen["input"] = x.is_contiguous(memory_format=torch.channels_last)
        convs = [m.weight for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
        seen["weights"] = all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)

    last = train(config(data, tmp_path / "last", channels_last=True), epoch_hook=inspect)
    plain = train(config(data, tmp_path / "plain"))
    assert seen == {"input": True, "weights": True}
    assert last.history[0]["loss"] == pytest.approx(plain.history[0]["loss"], rel=1e-4)


def test_bad_amp_options_are_one_clear_line(data, tmp_path):
    with pytest.raises(ConfigError) as info:
        config(data, tmp_path / "run", amp="fp8")
    assert str(info.value) == "invalid amp='fp8': choose one of off, bf16, fp16"
    result = CliRunner().invoke(train_command, ["--arch", "test-convnet", "--data", f"npz:{data}", "--epochs", "1",
                                                "--out", str(tmp_path / "cli"), "--amp", "fp8"])  # fmt: skip
    assert result.exit_code == 2 and "'fp8' is not one of 'off', 'bf16', 'fp16'" in result.output
    # a resumed run keeps the precision it was trained with
    run = tmp_path / "existing"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config(data, run).to_dict()))
    with pytest.raises(ConfigError, match=r"cannot change \['amp'\] when resuming"):
        resume(run, amp="bf16")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_torchjd_methods_train_under_amp(data, tmp_path, amp):
    # TorchJD's vmapped Jacobian failed in BatchNorm's backward under CPU autocast ("expected scalar type
    # BFloat16 but found Float"), a traceback from inside torch for every aggregator method.
    result = train(config(data, tmp_path / "run", method="pcgrad", amp=amp))
    assert math.isfinite(result.history[0]["loss"])


def test_torchjd_jacobian_under_autocast_matches_the_vmapped_one():
    from test_methods import ToyContext

    from anytime.training.methods import create_method

    def grads(precision: Precision) -> dict[str, torch.Tensor]:
        ctx = ToyContext(seed=3)
        ctx.precision = precision
        method = create_method("upgrad")
        method.setup(ctx)
        x, y = ctx.data[0]
        losses = ctx.exit_losses(ctx.model(x), y, 0)  # float32 forward: only the differentiation differs
        method.backward(ctx, losses, 0)
        return {n: p.grad for n, p in ctx.model.named_parameters() if p.grad is not None}

    vmapped, one_by_one = grads(Precision()), grads(Precision("bf16"))
    assert vmapped.keys() == one_by_one.keys()
    for n in vmapped:
        torch.testing.assert_close(one_by_one[n], vmapped[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("name", ["cagrad", "nashmtl", "alignedmtl"])
def test_fp16_overflow_is_a_skipped_step_for_the_aggregators(name):
    # An fp16 loss scale that overflows makes the Jacobian non-finite; the aggregators' solvers failed on
    # it (cvxpy "Parameter value must be real", "linalg.svd ... non-finite values") instead of letting
    # the loss scaler skip the step and lower the scale, as it does for joint training.
    from test_methods import ToyContext

    from anytime.training.methods import create_method

    ctx = ToyContext(seed=3)
    ctx.precision = precision = Precision("fp16")
    method = create_method(name)
    method.setup(ctx)
    x, y = ctx.data[0]
    losses = [precision.scale(loss) for loss in ctx.exit_losses(ctx.model(x), y, 0)]
    losses[0] = losses[0] * float("inf")  # what an overflowing fp16 backward produces
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    scale = precision.loss_scale
    method.backward(ctx, losses, 0)
    precision.step(ctx.optimizer)
    assert precision.loss_scale < scale
    for n, p in ctx.model.named_parameters():
        assert torch.equal(p, before[n]), n
