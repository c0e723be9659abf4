"""Two CPU processes under torchrun (gloo): identical weights on both ranks, close to one process at the
same global batch, one writer of the run directory. Covers a stepwise method and DR-MGF."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from anytime.models import create
from anytime.training.config import TrainConfig
from anytime.training.trainer import Trainer

METHODS = ["joint", "drmgf"]
TEARDOWN_ABORT = "terminate called without an active exception"

WORKER = textwrap.dedent(
    """
    import gc, json, os, sys, torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from anytime.training.config import TrainConfig
    from anytime.training.trainer import Trainer

    dist.init_process_group("gloo")  # one group for both runs; the trainer reuses it
    configs, out = json.loads(sys.argv[1]), sys.argv[2]
    for cfg in configs:
        trainer = Trainer(TrainConfig.from_dict(cfg))
        local, inner = [], trainer.method.train_epoch

        def spy(ctx, epoch, inner=inner, local=local):  # this rank's own training metrics
            metrics = inner(ctx, epoch)
            local.append(dict(metrics))
            return metrics

        trainer.method.train_epoch = spy
        trainer.run()
        with open(os.path.join(out, f"{cfg['method']}-rank{dist.get_rank()}.json"), "w") as f:
            json.dump(local, f)
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        torch.save(state, os.path.join(out, f"{cfg['method']}-rank{dist.get_rank()}.pt"))
    del trainer
    gc.collect()  # as shutdown_distributed does: nothing of the runs is left for interpreter finalisation
    dist.barrier()  # ... and no rank tears gloo down while its peer still uses it
    dist.destroy_process_group()
    """
)


def config_for(data: Path, out: Path, method: str) -> TrainConfig:
    # No augmentation: its random numbers are drawn per rank, which would differ from one process.
    return TrainConfig(
        arch="test-convnet", data=f"npz:{data}", method=method, epochs=1, out=str(out), batch_size=32,
        val_size=32, train_limit=128, lr=0.05, seed=3, device="cpu", augment=False, schedule="constant",
    )  # fmt: skip


def test_two_processes_match_each_other_and_one_process(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    x = (rng.integers(0, 80, (200, 12, 12)) + y[:, None, None] * 50).astype(np.uint8)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[:40], y_test=y[:40])

    configs = [config_for(data, tmp_path / f"ddp-{m}", m).to_dict() for m in METHODS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    def launch() -> subprocess.CompletedProcess:
        args = [*cmd, str(script), json.dumps(configs), str(tmp_path)]
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)

    proc = launch()
    written = [tmp_path / f"{m}-rank{r}.pt" for m in METHODS for r in (0, 1)]
    if proc.returncode != 0 and TEARDOWN_ABORT in proc.stderr and all(p.is_file() for p in written):
        # A rank aborted at interpreter exit after all its work was written (gloo's teardown in torch 2.13:
        # 1 of about 8 full-suite runs under load, none in 10 runs of this test alone); once more, from scratch.
        for path in [*tmp_path.glob("ddp-*"), *tmp_path.glob("*-rank*")]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        proc = launch()
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    for method in METHODS:
        rank0 = torch.load(tmp_path / f"{method}-rank0.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"{method}-rank1.pt", weights_only=True)
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), (method, key)

        torch.manual_seed(3)  # the trainer seeds, then builds the model: the same initial weights
        start = create("test-convnet", num_classes=3, in_channels=1, image_size=(12, 12)).state_dict()
        same_batch = _trained(config_for(data, tmp_path / f"single-{method}", method))
        per_rank_batch = _trained(config_for(data, tmp_path / f"half-{method}", method).replace(batch_size=16))
        # Same global batches: only BatchNorm's batch statistics differ (16 images per rank instead of 32),
        # so two processes land much closer to one process at batch 32 than to one at the per-rank batch.
        gap = _relative_gap(rank0, same_batch, start)
        control = _relative_gap(rank0, per_rank_batch, start)
        print(f"{method}: relative gap to one process at the same global batch {gap:.3f}, at batch 16 {control:.3f}")
        assert gap < 0.5 * control and gap < 0.2, (method, gap, control)

        run = tmp_path / f"ddp-{method}"
        rows = (run / "results.jsonl").read_text().splitlines()
        assert len(rows) == 1  # written once, by rank 0
        summary = json.loads((run / "summary.json").read_text())
        assert summary["world_size"] == 2 and len(summary["val_accuracy"]) == 3
        if method == "joint":
            assert json.loads(rows[0])["steps"] == 4  # 128 images / 32 per global step, 16 per rank
        # The recorded training losses are over the whole global batch (both ranks' equal shards), not rank 0's.
        local = [json.loads((tmp_path / f"{method}-rank{r}.json").read_text())[0] for r in (0, 1)]
        recorded = json.loads(rows[0])
        assert local[0]["loss"] != local[1]["loss"]
        for key in local[0]:
            assert recorded[key] == pytest.approx((local[0][key] + local[1][key]) / 2), (method, key)


def _trained(config: TrainConfig) -> dict[str, torch.Tensor]:
    trainer = Trainer(config)
    trainer.run()
    return trainer.model.state_dict()


def _relative_gap(a: dict, b: dict, start: dict) -> float:
    """||a - b|| / ||b - start|| over the learnable tensors (running statistics excluded)."""
    keys = [k for k, v in b.items() if v.is_floating_point() and "running" not in k]
    gap = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm()
    moved = torch.cat([(b[k] - start[k]).flatten() for k in keys]).norm()
    return float(gap / moved)
