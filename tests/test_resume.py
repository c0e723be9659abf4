"""A run killed with SIGKILL mid-epoch and resumed ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from anytime.training.config import TrainConfig
from anytime.training.trainer import resume, train


def write_npz(path: Path, n: int = 160, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.integers(0, 80, (n, 12, 12)) + y[:, None, None] * 50).astype(np.uint8)
    np.savez(path, x_train=x, y_train=y, x_test=x[:48], y_test=y[:48])
    return path


def config_for(data: Path, out: Path, method: str) -> TrainConfig:
    # 4 epochs so the lr drops (50%, 75%) and, for DR-MGF, the route switch happen after the resume.
    return TrainConfig(
        arch="test-convnet", data=f"npz:{data}", method=method, epochs=4, out=str(out), batch_size=16,
        val_size=32, lr=0.05, seed=7, device="cpu", deterministic=True,
    )  # fmt: skip


KILLER = textwrap.dedent(
    """
    import os, signal, sys, json, torch
    torch.set_num_threads(1)
    from anytime.training.config import TrainConfig
    from anytime.training.trainer import Trainer, train

    config = TrainConfig.from_dict(json.loads(sys.argv[1]))
    real = Trainer.log_step
    steps = {"n": 0}

    def log_step(self, loss, batch_size):
        real(self, loss, batch_size)
        if self._completed_epochs == 2:
            steps["n"] += 1
            if steps["n"] == 5:  # mid-way through the third epoch
                os.kill(os.getpid(), signal.SIGKILL)

    Trainer.log_step = log_step
    train(config)
    """
)


@pytest.mark.parametrize("method", ["joint", "drmgf"])
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path, method):
    from safetensors.torch import load_file

    data = write_npz(tmp_path / "d.npz")
    reference = train(config_for(data, tmp_path / "reference", method))

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cfg = json.dumps(config_for(data, killed, method).to_dict())
    proc = subprocess.run([sys.executable, "-c", KILLER, cfg], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    assert not (killed / "model.safetensors").exists()

    resumed = resume(killed)
    assert resumed.resumed_from_epoch == 2
    a = load_file(str(tmp_path / "reference" / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.val_accuracy == reference.val_accuracy
    rows = [json.loads(line) for line in (killed / "results.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (tmp_path / "reference" / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path):
    from anytime.errors import ConfigError

    data = write_npz(tmp_path / "d.npz")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config_for(data, run, "joint").to_dict()))
    with pytest.raises(ConfigError, match=r"cannot change \['lr'\] when resuming"):
        resume(run, lr=0.5)


def test_cli_summary_counts_only_the_epochs_run_in_this_process(tmp_path, capsys):
    from anytime.cli.train import _print_summary
    from anytime.training.trainer import RunResult

    history = [{"epoch": e, "train_time_s": t} for e, t in [(1, 10.0), (2, 10.0), (3, 4.0)]]
    _print_summary(RunResult(tmp_path, None, [0.5], [0.5], history, resumed_from_epoch=2))
    assert "1 epochs run here, 4.0 s per epoch" in capsys.readouterr().out
    _print_summary(RunResult(tmp_path, None, [0.5], [0.5], history[:2], resumed_from_epoch=2))  # nothing left to run
    assert "epochs run here" not in capsys.readouterr().out


def test_resuming_a_finished_run_trains_evaluates_and_writes_nothing(tmp_path, monkeypatch):
    from anytime.training.trainer import Trainer

    data = write_npz(tmp_path / "d.npz")
    run = tmp_path / "run"
    first = train(config_for(data, run, "joint").replace(epochs=1))
    weights = (run / "model.safetensors").stat().st_mtime_ns

    def never(*args, **kwargs):
        raise AssertionError("a finished run was evaluated again")

    monkeypatch.setattr(Trainer, "evaluate", never)
    again = resume(run)
    assert (again.val_accuracy, again.test_accuracy) == (first.val_accuracy, first.test_accuracy)
    assert (run / "model.safetensors").stat().st_mtime_ns == weights
    # A finish that was cut short (no model written yet) is completed on resume.
    (run / "model.safetensors").unlink()
    monkeypatch.undo()
    resume(run)
    assert (run / "model.safetensors").is_file()
