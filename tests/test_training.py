"""`anytime train` end to end on a tiny synthetic task: the run directory, errors, NaN stop, Ctrl-C."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from anytime.cli.train import train as train_command
from anytime.data import open_dataset, restore_split
from anytime.errors import ConfigError, DatasetError, OutputError, TrainingError
from anytime.training.config import TrainConfig, build_options
from anytime.training.trainer import Trainer, train


def write_stripes_npz(path: Path, n_train: int = 384, n_test: int = 64, classes: int = 4, seed: int = 0) -> Path:
    """1×16×16 noisy textures, one per class (horizontal/vertical stripes, checker, flat): learnable
    in a few steps and unchanged in kind by the random-crop and flip augmentation."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16]
    patterns = np.stack([(yy // 2) % 2, (xx // 2) % 2, ((yy // 2) + (xx // 2)) % 2, np.ones((16, 16))])[:classes]

    def make(n):
        y = rng.integers(0, classes, n)
        x = patterns[y] * 150 + rng.integers(0, 80, (n, 16, 16))
        return x.astype(np.uint8), y

    (xtr, ytr), (xte, yte) = make(n_train), make(n_test)
    np.savez(
        path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, classes=np.array([f"band{i}" for i in range(classes)])
    )
    return path


@pytest.fixture
def stripes(tmp_path) -> Path:
    return write_stripes_npz(tmp_path / "stripes.npz")


def base_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--arch", "test-convnet", "--data", f"npz:{data}", "--epochs", "2", "-o", str(out),
        "--batch-size", "32", "--val-size", "32", "--lr", "0.1", "--device", "cpu", "-q", *extra,
    ]  # fmt: skip


def test_cli_train_writes_a_complete_run_directory(stripes, tmp_path):
    from anytime.models import load_model

    run = tmp_path / "run"
    result = CliRunner().invoke(train_command, base_args(stripes, run, "--method", "joint", "-m", "weights=1,1,2"))
    assert result.exit_code == 0, result.output
    assert "avg" in result.output and f"anytime export {run}" in result.output

    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "joint" and config["batch_size"] == 32 and config["epochs"] == 2
    # fully resolved: every option of the method, typed
    assert config["method_options"] == {"weights": [1.0, 1.0, 2.0]}
    split = json.loads((run / "split.json").read_text())
    train_idx, val_idx = restore_split(open_dataset(split["dataset"]), split)
    assert len(val_idx) == 32 and not set(val_idx) & set(train_idx)
    assert all(line.count("\n") == 0 for line in (run / "split.json").read_text().splitlines())
    assert (run / "split.json").read_text().count("\n") == len(split) + 2  # one field a line

    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.01])  # /10 at 50% of the epochs
    for r in rows:
        assert len(r["val_acc"]) == 3 and r["images_per_s"] > 0 and r["train_time_s"] > 0 and math.isfinite(r["loss"])
    with open(run / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and {"epoch", "loss", "val_acc_0", "val_acc_2", "images_per_s"} <= set(table[0])
    assert float(table[1]["val_acc_mean"]) == pytest.approx(rows[1]["val_acc_mean"])

    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["method"]["name"] == "joint" and len(ckpt["history"]) == 2
    model, meta = load_model(run)
    assert meta["classes"] == ["band0", "band1", "band2", "band3"] and meta["spec"]["in_channels"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["test_accuracy"]) == 3
    assert summary["test_accuracy_mean"] == pytest.approx(np.mean(summary["test_accuracy"]))
    # the task is learnable: the exits beat chance (0.25) clearly after two epochs
    assert summary["test_accuracy_mean"] > 0.6


@pytest.mark.parametrize(
    "change, message",
    [
        (["--arch", "msdnet-tinyy"], "unknown model 'msdnet-tinyy'"),
        (["--method", "pcgard"], "unknown training method 'pcgard'. Did you mean: pcgrad"),
        (["--data", "npz:/nonexistent/x.npz"], "path does not exist"),
        (["--data", "bogus:/x"], "unknown dataset kind 'bogus'"),
        (["--num-classes", "10"], "--num-classes 10 does not match .* which has 4 classes"),
        (["-m", "c=1"], r"unknown option\(s\) \['c'\] for method 'joint'"),
        (["--lr", "-1"], "invalid lr=-1.0"),
        (["--batch-size", "1000"], "fewer than one batch"),
    ],
)
def test_bad_input_is_a_clear_error_before_training(stripes, tmp_path, change, message):
    from anytime.cli import main

    run = tmp_path / "run"
    args = base_args(stripes, run)
    for i in range(0, len(change), 2):
        if change[i] in args:
            args[args.index(change[i]) + 1] = change[i + 1]
        else:
            args += change[i : i + 2]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args])
    assert exit_info.value.code == 2
    import re

    assert not (run / "results.jsonl").exists() and not (run / "checkpoints").exists()
    # the message is checked through the Python API, which raises the same error
    assert re.search(message, _error_of(args)), _error_of(args)


def _error_of(args: list[str]) -> str:
    result = CliRunner().invoke(train_command, args)
    assert result.exception is not None and not isinstance(result.exception, (AssertionError, TypeError, KeyError))
    return str(result.exception)


def test_unwritable_or_occupied_output_directory(stripes, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match=f"'{blocker}' is a file, not a directory"):
        Trainer(TrainConfig(arch="test-convnet", data=f"npz:{stripes}", epochs=1, out=str(blocker / "run")))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        Trainer(TrainConfig(arch="test-convnet", data=f"npz:{stripes}", epochs=1, out=str(tmp_path / "old")))


def small_config(data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(arch="test-convnet", data=f"npz:{data}", epochs=2, out=str(out), batch_size=32, val_size=32,
                  lr=0.1, device="cpu")  # fmt: skip
    values.update(kw)
    return TrainConfig(**values)


def test_nan_loss_stops_naming_epoch_step_and_exit_and_keeps_last_good_checkpoint(stripes, tmp_path, monkeypatch):
    real = Trainer.exit_losses
    calls = {"n": 0}

    def poisoned(self, outputs, targets, epoch):
        losses = real(self, outputs, targets, epoch)
        if epoch == 1:
            calls["n"] += 1
            if calls["n"] == 3:  # third step (step index 2) of the second epoch
                losses[1] = losses[1] * float("nan")
        return losses

    monkeypatch.setattr(Trainer, "exit_losses", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"epoch 2, step 2, exit 2 of 3.*checkpoint \(after epoch 1\)"):
        train(small_config(stripes, run))
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert len((run / "results.jsonl").read_text().splitlines()) == 1
    assert not (run / "model.safetensors").exists()


def test_ctrl_c_keeps_the_checkpoint_and_resume_finishes(stripes, tmp_path, monkeypatch):
    real = Trainer.log_step
    state = {"interrupt": True}

    def interrupted(self, loss, batch_size):
        if state["interrupt"] and self._completed_epochs == 1:
            state["interrupt"] = False
            raise KeyboardInterrupt
        return real(self, loss, batch_size)

    monkeypatch.setattr(Trainer, "log_step", interrupted)
    run = tmp_path / "run"
    result = CliRunner().invoke(train_command, base_args(stripes, run))
    assert result.exit_code == 130
    assert f"anytime train --resume {run}" in result.output
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1

    resumed = CliRunner().invoke(train_command, ["--resume", str(run), "-q"])
    assert resumed.exit_code == 0, resumed.output
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    refused = CliRunner().invoke(train_command, ["--resume", str(tmp_path / "nothing-here"), "-q"])
    assert refused.exit_code != 0 and "not a run directory" in str(refused.exception)


def test_distillation_and_lr_schedules(stripes, tmp_path):
    trainer = Trainer(small_config(stripes, tmp_path / "a", epochs=8))
    assert [trainer.lr(e) for e in range(8)] == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    cosine = Trainer(small_config(stripes, tmp_path / "b", epochs=4, schedule="cosine"))
    assert [cosine.lr(e) for e in range(4)] == pytest.approx(
        [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    )
    result = train(
        small_config(stripes, tmp_path / "kd", epochs=1, kd_weight=0.5, kd_temperature=2.0, method="ge", val_size=0)
    )
    config = json.loads((tmp_path / "kd" / "config.json").read_text())
    assert config["kd_weight"] == 0.5 and config["method"] == "ge"
    assert len(result.test_accuracy) == 3 and result.val_accuracy == []  # no hold-out: no validation numbers
    summary = json.loads((tmp_path / "kd" / "summary.json").read_text())
    assert summary["val_accuracy_mean"] is None


def test_option_parsing_is_typed_and_strict():
    from anytime.training.methods.joint import JointOptions

    opts = build_options(JointOptions, {"weights": "1, 2,3"}, "method 'joint'")
    assert opts.weights == (1.0, 2.0, 3.0)
    assert build_options(JointOptions, {"weights": "none"}, "x").weights is None
    with pytest.raises(ConfigError, match="must be float"):
        build_options(JointOptions, {"weights": "1,abc"}, "method 'joint'")
    cfg = TrainConfig(arch="a", data="npz:x", epochs=3, out="o", milestones=(0.3, 0.6))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="milestones"):
        TrainConfig(arch="a", data="npz:x", epochs=3, out="o", milestones=(0.8, 0.3))


@pytest.mark.parametrize(
    "method, options",
    [
        ("drmgf", {"kappa": "inf"}),
        ("drmgf", {"fusion_init": "nan"}),
        ("drmgf", {"passes": "split", "split_gain": "inf"}),
        ("joint", {"weights": "1,inf,1"}),
        ("cagrad", {"c": float("inf")}),
        ("nashmtl", {"max_norm": "nan"}),
    ],
)
def test_method_options_refuse_non_finite_numbers(method, options):
    # These were accepted; a run then met them only once training had started (NaN weights or losses).
    from anytime.training.methods import create_method

    name = next(iter(options)) if len(options) == 1 else "split_gain"
    with pytest.raises(ConfigError, match=f"option '{name}' must be a finite number"):
        create_method(method, options)


@pytest.mark.parametrize(
    "change, name",
    [
        ({"batch_size": 64.5}, "batch_size"),
        ({"lr": "0.1"}, "lr"),
        ({"seed": 1.5}, "seed"),
        ({"train_limit": 2.5}, "train_limit"),
        ({"workers": True}, "workers"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"kd_temperature": float("inf")}, "kd_temperature"),
        ({"val_size": True}, "val_size"),
        ({"milestones": "0.5,0.75"}, "milestones"),
    ],
)
def test_train_config_from_python_refuses_wrong_types_in_one_line(change, name):
    # The CLI types its options; TrainConfig(...) from Python took these (or raised a bare TypeError).
    with pytest.raises(ConfigError, match=f"invalid {name}="):
        TrainConfig(arch="a", data="npz:x", epochs=3, out="o", **change)
    cfg = TrainConfig(arch="a", data="npz:x", epochs=3, out="o", milestones=[0.5], lr=1)
    assert cfg.milestones == (0.5,)  # a list is kept as the tuple the CLI gives


def test_config_records_the_dataset_with_an_absolute_path(tmp_path, monkeypatch):
    from anytime.training.config import TrainConfig
    from anytime.training.trainer import train

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 96)
    x = rng.integers(0, 255, (96, 12, 12), dtype=np.uint8)
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "d.npz", x_train=x, y_train=y, x_test=x[:16], y_test=y[:16])
    monkeypatch.chdir(tmp_path)
    train(
        TrainConfig(
            arch="test-convnet",
            data="npz:data/d.npz",
            method="joint",
            epochs=1,
            out="run",
            batch_size=32,
            val_size=32,
            device="cpu",
        )
    )
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert saved == f"npz:{(tmp_path / 'data' / 'd.npz').resolve()}"


def test_resume_refuses_options_it_would_otherwise_ignore(stripes, tmp_path):
    # `--resume RUN --epochs 4` used to drop --epochs silently (and re-finish the 2-epoch run).
    run = tmp_path / "run"
    assert CliRunner().invoke(train_command, base_args(stripes, run)).exit_code == 0
    before = (run / "results.jsonl").read_text()
    refused = CliRunner().invoke(train_command, ["--resume", str(run), "--epochs", "4", "-m", "weights=1,1,1", "-q"])
    assert refused.exit_code != 0
    message = str(refused.exception)
    assert isinstance(refused.exception, ConfigError), refused.output
    assert "--epochs" in message and "--method-option" in message and "-o/--output" in message
    both = CliRunner().invoke(train_command, ["--resume", str(run), "-o", str(tmp_path / "other"), "-q"])
    assert both.exit_code == 2 and "not both" in both.output
    assert (run / "results.jsonl").read_text() == before and not (tmp_path / "other").exists()
    # what a resume may change is still accepted
    allowed = CliRunner().invoke(train_command, ["--resume", str(run), "--device", "cpu", "--workers", "0", "-q"])
    assert allowed.exit_code == 0, allowed.output


def test_a_run_stopped_in_its_first_epoch_resumes_from_the_beginning(stripes, tmp_path, monkeypatch):
    # Ctrl-C before the first checkpoint: the new-run check pointed at --resume, and --resume at a new run.
    def interrupted(self, loss, batch_size):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "log_step", interrupted)
    run = tmp_path / "run"
    result = CliRunner().invoke(train_command, base_args(stripes, run))
    assert result.exit_code == 130
    assert f"`anytime train --resume {run}` starts it again from the beginning" in result.output
    assert (run / "config.json").is_file() and not (run / "checkpoints" / "last.pt").exists()
    monkeypatch.undo()

    again = CliRunner().invoke(train_command, base_args(stripes, run))
    assert again.exit_code != 0 and "starts it again from the beginning" in str(again.exception)
    resumed = CliRunner().invoke(train_command, ["--resume", str(run), "-q"])
    assert resumed.exit_code == 0, resumed.output
    # the same run as one never interrupted
    reference = tmp_path / "reference"
    assert CliRunner().invoke(train_command, base_args(stripes, reference)).exit_code == 0
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert "continue it with" not in str(again.exception)


def test_a_data_set_of_one_class_is_refused(tmp_path):
    # It trained a 1-class "classifier" at 100% accuracy and exported it without a word.
    x = np.random.default_rng(0).integers(0, 256, (96, 16, 16), dtype=np.uint8)
    data = tmp_path / "one.npz"
    np.savez(data, x_train=x, y_train=np.zeros(96, np.int64), x_test=x[:8], y_test=np.zeros(8, np.int64))
    run = tmp_path / "run"
    with pytest.raises(DatasetError, match="has 1 class .*at least 2"):
        train(small_config(data, run, epochs=1))
    assert not (run / "config.json").exists()


def test_cli_val_size_takes_a_count_or_a_fraction(stripes, tmp_path):
    from anytime.data.split import ranges_indices

    run = tmp_path / "run"
    args = base_args(stripes, run, "--epochs", "1")
    args[args.index("--val-size") + 1] = "0.25"
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output
    record = json.loads((run / "split.json").read_text())
    assert len(ranges_indices(record["val_ranges"], "val_ranges")) == 96  # a quarter of 384
    for bad in ("abc", "1.5", "-0.2"):
        args[args.index("--val-size") + 1] = bad
        refused = CliRunner().invoke(train_command, [*args[:-2], "-o", str(tmp_path / bad), "-q"])
        assert refused.exit_code != 0 and "a number of images (5000) or a fraction (0.1)" in str(refused.exception)
