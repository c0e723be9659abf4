"""The trainer: builds data, model, optimiser and method from a `TrainConfig`, drives the method's epochs,
evaluates, and keeps the run directory (see docs/architecture.md) resumable at every epoch.

`Trainer` implements `anytime.training.base.TrainingContext`; it never tests method names. The pieces it
drives live next to it: `preflight` (configuration checks), `schedule` (lr), `progress` (bar, images/s),
`evaluate` (per-exit accuracy), `records` (config, results, summary), `checkpoint`, `interrupts`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from anytime.data.split import split_record_text
from anytime.errors import ConfigError, DatasetError, TrainingError
from anytime.fileio import atomic_write_text
from anytime.formats.rundir import CHECKPOINT, MODEL_META, MODEL_WEIGHTS, SPLIT_FILE, SUMMARY_FILE
from anytime.training import distributed as ddp
from anytime.training.base import Routes, TrainingMethod, compute_routes
from anytime.training.checkpoint import load_run_checkpoint, save_run_checkpoint
from anytime.training.compilation import F, check_compile, compile_function, compile_model
from anytime.training.config import TrainConfig, options_to_dict
from anytime.training.evaluate import exit_accuracy
from anytime.training.interrupts import defer_keyboard_interrupt
from anytime.training.losses import ExitLoss, exit_weights
from anytime.training.precision import Precision
from anytime.training.preflight import check_precision, preflight, resolve_device, resume_config
from anytime.training.progress import Progress
from anytime.training.records import epoch_row, write_config, write_results, write_summary
from anytime.training.schedule import scheduled_lr, set_lr

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run produced (also in RUN_DIR/summary.json)."""

    run_dir: Path
    config: TrainConfig
    val_accuracy: list[float]
    test_accuracy: list[float] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int = 0

    @property
    def val_mean(self) -> float:
        return float(np.mean(self.val_accuracy)) if self.val_accuracy else float("nan")

    @property
    def test_mean(self) -> float | None:
        return None if not self.test_accuracy else float(np.mean(self.test_accuracy))

    @property
    def epoch_time_s(self) -> float:
        times = [row["train_time_s"] for row in self.history]
        return float(np.mean(times)) if times else float("nan")


EpochHook = Callable[["Trainer", int, dict[str, Any]], None]
"""Called after each epoch's training and validation with (trainer, 0-based epoch, the results row); it
may add JSON-serialisable keys to the row, which is then checkpointed and written to results.jsonl/csv
(so a resumed run keeps them). Time spent in the hook is not training time."""


def train(config: TrainConfig, *, progress: bool = False, epoch_hook: EpochHook | None = None) -> RunResult:
    """Train from scratch into `config.out` (which must not already hold a run)."""
    return Trainer(config, progress=progress, epoch_hook=epoch_hook).run()


def resume(
    run_dir: str | os.PathLike, *, progress: bool = False, epoch_hook: EpochHook | None = None, **overrides: Any
) -> RunResult:
    """Continue the run in `run_dir` from its last checkpoint (from the beginning if no epoch had completed).

    Only `device`, `workers` and `compile` may change.
    """
    config = resume_config(Path(run_dir), overrides)
    return Trainer(config, progress=progress, resume=True, epoch_hook=epoch_hook).run()


def phase_seed(seed: int, phase: str) -> int:
    """The loader seed of a pass: the run's seed for the plain 'train' pass, a stable mix otherwise."""
    if phase == "train":
        return seed
    return (seed * 1_000_003 + zlib.crc32(phase.encode())) % (2**63 - 1)


class Trainer:
    """One training run. Implements the `TrainingContext` protocol handed to the method."""

    def __init__(
        self, config: TrainConfig, *, progress: bool = False, resume: bool = False, epoch_hook: EpochHook | None = None
    ) -> None:
        self.config = config
        self.epoch_hook = epoch_hook
        self.resuming = resume
        self.run_dir = Path(config.out)
        # A run stopped before its first epoch ended has no checkpoint: resuming it starts it from the beginning.
        self.from_checkpoint = resume and (self.run_dir / CHECKPOINT).is_file()
        self.dist = ddp.env_dist_info()
        self.rank = self.dist.rank
        self.world_size = self.dist.world_size
        self.epochs = config.epochs
        self.progress = Progress(config.epochs, show=progress and self.dist.is_main)
        self._completed_epochs = 0
        self.method: TrainingMethod = preflight(config, self.dist, resuming=resume)

    # ----------------------------------------------------------------- building
    def _build(self) -> None:
        from anytime.data import (
            channel_stats,
            default_augmentation,
            open_dataset,
            restore_split,
            split_train_val,
        )
        from anytime.models import create

        cfg = self.config
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        check_precision(cfg.amp, self.device)
        check_compile(cfg.compile, self.device)
        self.precision = Precision(cfg.amp, self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self._started_group = ddp.init_distributed(self.dist, self.device)
        self._seed_everything(cfg.seed)

        self.dataset = open_dataset(cfg.data)
        if not self.resuming and cfg.data != self.dataset.spec:
            # Record the absolute spec: export and --resume may run from another working directory.
            self.config = cfg = cfg.replace(data=self.dataset.spec)
        info = self.dataset.info
        if info.num_classes < 2:
            raise DatasetError(
                f"the data set {self.dataset.spec} has {info.num_classes} class ({', '.join(info.classes)}); a "
                "classifier needs at least 2: check the labels (or the class sub-directories of an image folder)"
            )
        if cfg.num_classes is not None and cfg.num_classes != info.num_classes:
            raise DatasetError(
                f"--num-classes {cfg.num_classes} does not match the data set {self.dataset.spec}, which has "
                f"{info.num_classes} classes ({', '.join(info.classes[:5])}{', ...' if info.num_classes > 5 else ''}); "
                "drop --num-classes or use matching data"
            )
        split_path = self.run_dir / SPLIT_FILE
        if self.resuming and (self.from_checkpoint or split_path.is_file()):
            self.split_record = json.loads(split_path.read_text())
            train_idx, val_idx = restore_split(self.dataset, self.split_record)
        else:
            train_idx, val_idx, self.split_record = split_train_val(self.dataset, cfg.val_size, seed=cfg.seed)
        if cfg.train_limit is not None:
            train_idx = train_idx[: cfg.train_limit]
        self.train_indices = np.asarray(train_idx)
        if len(self.train_indices) < cfg.batch_size:
            raise ConfigError(
                f"the training split has {len(self.train_indices)} images, fewer than one batch of {cfg.batch_size}; "
                "lower --batch-size or raise --train-limit"
            )
        val_base = self.dataset.val if self.split_record["source"] == "dataset-val" else self.dataset.train
        self.val_split = (val_base, np.asarray(val_idx))

        # --model-option image_size=... chooses the input size for sources without one (image folders of
        # photos of many sizes), or overrides the data set's.
        sizing = {"num_classes": info.num_classes, "in_channels": info.channels, "image_size": info.image_size}
        self.model = create(cfg.arch, **{**sizing, **dict(cfg.model_options)}).to(
            self.device, memory_format=self.memory_format
        )
        self.num_exits = self.model.num_exits
        spec = self.model.spec
        self.image_size = tuple(spec.image_size)
        self.channels = spec.in_channels
        self.mean, self.std = channel_stats(info, self.channels)
        aug = default_augmentation(info)
        self.pad = int(aug["pad"]) if cfg.augment else 0
        self.flip = bool(aug["flip"]) and cfg.augment
        # The probe runs before any training step, so the first epoch is identical with and without it.
        ddp.broadcast_module(self.model)

        self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
        )  # fmt: skip
        self.exit_loss = ExitLoss(cfg.kd_weight, cfg.kd_temperature)
        self.exit_weighting = self.model.default_exit_weights if cfg.exit_weights == "auto" else cfg.exit_weights
        example, _ = next(iter(self._loader(self.dataset.train, self.train_indices[:2], train=False, batch_size=2)))
        self.routes: Routes = compute_routes(self.model, example.to(self.device, memory_format=self.memory_format))
        self.steps_per_epoch = len(self._train_loader(seed=cfg.seed))
        compile_model(self.model, cfg.compile, self.num_exits)  # after the routes' probe, which needs eager autograd
        self.method.setup(self)

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _loader(
        self,
        split,
        indices,
        *,
        train: bool,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        shard: bool = True,
        part=None,
    ):
        from anytime.data import make_loader

        return make_loader(
            split, indices, batch_size=batch_size, train=train, mean=self.mean, std=self.std,
            image_size=self.image_size, channels=self.channels, seed=seed, epoch=epoch,
            rank=self.rank if shard else 0, world_size=self.world_size if shard else 1,
            drop_last=train, num_workers=self.config.workers, pad=self.pad, flip=self.flip, part=part,
        )  # fmt: skip

    def _train_loader(self, seed: int, epoch: int = 0, part: tuple[int, int] | None = None):
        """This rank's shard of the training set in training batches (augmented, the last partial one dropped)."""
        per_rank = self.config.batch_size // self.world_size
        return self._loader(
            self.dataset.train, self.train_indices, train=True, batch_size=per_rank, seed=seed, epoch=epoch, part=part
        )

    # ----------------------------------------------------------------- TrainingContext
    def train_batches(
        self, epoch: int, phase: str, part: tuple[int, int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = self._train_loader(phase_seed(self.config.seed, phase), epoch, part)
        label = phase if part is None else f"{phase} {part[0] + 1}/{part[1]}"
        self.progress.start_phase(epoch, label, len(loader))
        # A copy from pageable host memory is synchronous; from pinned memory it overlaps the GPU's work.
        pin = self.device.type == "cuda"
        try:
            for x, y in loader:
                if pin:
                    x, y = x.pin_memory(), y.pin_memory()
                yield (
                    x.to(self.device, non_blocking=pin, memory_format=self.memory_format),
                    y.to(self.device, non_blocking=pin),
                )
        finally:
            self.progress.close()

    def exit_losses(self, outputs: list[torch.Tensor], targets: torch.Tensor, epoch: int) -> list[torch.Tensor]:
        weights = exit_weights(self.exit_weighting, self.num_exits, epoch, self.epochs)
        return [w * loss if w != 1.0 else loss for w, loss in zip(weights, self.exit_loss(outputs, targets))]

    def lr(self, epoch: int) -> float:
        return scheduled_lr(self.config, epoch)

    def compiled(self, fn: F) -> F:
        return compile_function(fn, self.config.compile)

    def sync_gradients(self, params: Iterable[torch.Tensor]) -> None:
        if self.world_size > 1:
            ddp.average_gradients(params)

    def sync_buffers(self, module: nn.Module) -> None:
        if self.world_size > 1:
            ddp.average_buffers(module)

    def check_finite(self, loss: torch.Tensor, epoch: int, step: int, exit_index: int | None) -> None:
        value = float(loss.detach())
        if math.isfinite(value):
            return
        where = "the total loss" if exit_index is None else f"exit {exit_index + 1} of {self.num_exits}"
        kept = (
            f"the last good checkpoint (after epoch {self._completed_epochs}) is kept in {self.run_dir / CHECKPOINT}"
            if self._completed_epochs
            else "no epoch had completed, so there is no checkpoint"
        )
        raise TrainingError(
            f"non-finite loss ({value}) at epoch {epoch + 1}, step {step}, {where} (phase '{self.progress.phase}'); "
            f"training stopped and {kept}. Lower --lr (now {self.lr(epoch):g}) or check the data"
        )

    def log_step(self, loss: float, batch_size: int) -> None:
        self.progress.step(loss, batch_size * self.world_size)

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, model: nn.Module, split, indices) -> list[float]:
        """Per-exit top-1 accuracy; ranks evaluate disjoint shards and sum their counts."""
        batches = self._loader(split, indices, train=False, batch_size=self.config.eval_batch_size)
        return exit_accuracy(model, batches, self.num_exits, self.device, self.memory_format)

    # ----------------------------------------------------------------- run
    def run(self) -> RunResult:
        cfg = self.config
        previous_determinism = torch.are_deterministic_algorithms_enabled()
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self._started_group = False
        try:
            self._build()
            self._completed_epochs = 0
            history: list[dict[str, Any]] = []
            if self.from_checkpoint:
                history = self._load_checkpoint()
            elif self.dist.is_main:  # a new run, or one resumed that had not finished its first epoch
                write_config(self.run_dir, self.config, self.method.options)
                atomic_write_text(self.run_dir / SPLIT_FILE, split_record_text(self.split_record))
            resumed_from = self._completed_epochs
            for epoch in range(self._completed_epochs, cfg.epochs):
                history.append(self._run_epoch(epoch, history))
            return self._finish(history, resumed_from)
        finally:
            self.progress.close()
            if cfg.deterministic:
                torch.use_deterministic_algorithms(previous_determinism)
            ddp.shutdown_distributed(self._started_group)

    def _run_epoch(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        lr = self.lr(epoch)
        set_lr(self.optimizer, lr)
        self.progress.start_epoch()
        start, cpu_start = time.perf_counter(), time.process_time()
        metrics = self.method.train_epoch(self, epoch)
        if self.world_size > 1:
            metrics = _mean_over_ranks(metrics)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_time, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        val = self.evaluate(self.model, *self.val_split)
        row = epoch_row(
            epoch, lr, metrics, val, train_time, time.perf_counter() - start, self.progress.epoch_images, train_cpu
        )
        if self.epoch_hook is not None:
            self.epoch_hook(self, epoch, row)
        self._completed_epochs = epoch + 1
        # Ctrl-C while the checkpoint is written must not leave the run without this epoch.
        with defer_keyboard_interrupt():
            if self.dist.is_main:
                self._save_checkpoint(history + [row])
                write_results(self.run_dir, history + [row])
        ddp.barrier()
        (logger.info if self.dist.is_main else logger.debug)(
            "epoch %d/%d loss %.4f val %s (mean %s) %.1fs %.0f img/s", epoch + 1, self.epochs, row.get("loss", float("nan")),
            " ".join(f"{a:.3f}" for a in val) or "-", "-" if not val else f"{row['val_acc_mean']:.4f}", train_time,
            row["images_per_s"],
        )  # fmt: skip
        return row

    def _finish(self, history: list[dict[str, Any]], resumed_from: int) -> RunResult:
        from anytime.formats.preprocessing import PreprocessingSpec
        from anytime.models import save_model

        finished = self._finished_before(resumed_from)
        if finished is not None:
            return RunResult(self.run_dir, self.config, finished[0], finished[1], history, resumed_from)
        plain = self.method.plain_model(self.model)
        val = self.evaluate(plain, *self.val_split)
        test = None
        if self.dataset.test is not None:
            test = self.evaluate(plain, self.dataset.test, None)
        if self.dist.is_main:
            info = self.dataset.info
            provenance = {
                "method": self.config.method,
                "method_options": options_to_dict(self.method.options),
                "epochs": self.config.epochs,
                "data": self.dataset.spec,
                "val_accuracy": val,
            }
            preprocessing = PreprocessingSpec.for_model(self.channels, self.image_size, self.mean, self.std)
            save_model(plain, self.run_dir, preprocessing, list(info.classes), provenance)
            write_summary(self.run_dir, self.config, val, test, history, self.world_size)
        ddp.barrier()
        return RunResult(self.run_dir, self.config, val, test, history, resumed_from)

    def _finished_before(self, resumed_from: int) -> tuple[list[float], list[float] | None] | None:
        """(val, test) accuracies of a resumed run that had already finished and written its model, read from
        its summary: nothing is trained, so nothing is evaluated or written again (None otherwise)."""
        if not self.from_checkpoint or resumed_from < self.epochs:
            return None
        files = [self.run_dir / name for name in (SUMMARY_FILE, MODEL_WEIGHTS, MODEL_META)]
        if not all(f.is_file() for f in files):
            return None  # its finish was cut short: evaluate and write the model now
        try:
            summary = json.loads(files[0].read_text())
            val, test = [float(v) for v in summary["val_accuracy"]], summary.get("test_accuracy")
            test = None if test is None else [float(v) for v in test]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        logger.info(
            "%s had finished all %d epochs: nothing to train; to train longer, start a new run with more --epochs",
            self.run_dir,
            self.epochs,
        )
        return val, test

    # ----------------------------------------------------------------- checkpoint
    def _save_checkpoint(self, history: list[dict[str, Any]]) -> None:
        save_run_checkpoint(
            self.run_dir / CHECKPOINT,
            epoch=self._completed_epochs,
            config=self.config,
            model=self.model,
            optimizer=self.optimizer,
            next_lr=self.lr(min(self._completed_epochs, self.epochs - 1)),
            method=self.method,
            precision=self.precision,
            history=history,
        )

    def _load_checkpoint(self) -> list[dict[str, Any]]:
        self._completed_epochs, history = load_run_checkpoint(
            self.run_dir / CHECKPOINT,
            config=self.config,
            model=self.model,
            optimizer=self.optimizer,
            method=self.method,
            precision=self.precision,
            map_location=self.device,
        )
        logger.info("resumed %s after epoch %d", self.run_dir, self._completed_epochs)
        return history


def _mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """A method's epoch metrics (means over this rank's shard) as means over the whole training set.

    Every rank trains on an equal-sized shard in equal batches, so the plain mean over ranks is the mean
    over all images; counts that every rank shares (steps) stay as they are."""
    values = torch.tensor([float(v) for v in metrics.values()], dtype=torch.float64)
    ddp.average_tensors([values])
    return dict(zip(metrics, values.tolist()))


__all__ = ["RunResult", "Trainer", "TrainConfig", "resume", "train"]
