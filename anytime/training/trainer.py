"""The trainer: builds data, model, optimiser and method from a `TrainConfig`, drives the method's epochs,
evaluates, and keeps the run directory (see docs/architecture.md) resumable at every epoch.

`Trainer` implements `anytime.training.base.TrainingContext`; it never tests method names.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from anytime.errors import ConfigError, DatasetError, TrainingError
from anytime.fileio import atomic_write_json, atomic_write_text
from anytime.formats.rundir import (
    CHECKPOINT,
    CONFIG_FILE,
    RESULTS_CSV,
    RESULTS_JSONL,
    SPLIT_FILE,
    SUMMARY_FILE,
)
from anytime.training import distributed as ddp
from anytime.training.base import Routes, TrainingMethod, compute_routes
from anytime.training.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from anytime.training.config import TrainConfig, options_to_dict
from anytime.training.losses import ExitLoss, exit_weights

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
    """Continue the run in `run_dir` from its last checkpoint. Only `device` and `workers` may change."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"cannot resume: {path} not found; '{run_dir}' is not a run directory written by anytime train")
    allowed = {"device", "workers"}
    bad = sorted(k for k, v in overrides.items() if v is not None and k not in allowed)
    if bad:
        raise ConfigError(
            f"cannot change {bad} when resuming: a resumed run repeats its configuration exactly "
            f"(only {sorted(allowed)} may change); start a new run with another --out instead"
        )
    config = TrainConfig.from_dict(json.loads(path.read_text()))
    changes = {k: v for k, v in overrides.items() if v is not None}
    config = config.replace(out=str(run_dir), **changes)
    return Trainer(config, progress=progress, resume=True, epoch_hook=epoch_hook).run()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was requested but CUDA is not available here; use --device cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def phase_seed(seed: int, phase: str) -> int:
    """The loader seed of a pass: the run's seed for the plain 'train' pass, a stable mix otherwise."""
    if phase == "train":
        return seed
    return (seed * 1_000_003 + zlib.crc32(phase.encode())) % (2**63 - 1)


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the output directory '{directory}' ({exc.strerror or exc}); choose another --out"
        ) from exc


class Trainer:
    """One training run. Implements the `TrainingContext` protocol handed to the method."""

    def __init__(
        self, config: TrainConfig, *, progress: bool = False, resume: bool = False, epoch_hook: EpochHook | None = None
    ) -> None:
        self.config = config
        self.epoch_hook = epoch_hook
        self.resuming = resume
        self.show_progress = progress
        self.run_dir = Path(config.out)
        self.dist = ddp.env_dist_info()
        self.rank = self.dist.rank
        self.world_size = self.dist.world_size
        self.epochs = config.epochs
        self._bar: Any = None
        self._phase = ""
        self._epoch_images = 0
        self._running_loss: float | None = None
        self._phase_start = 0.0
        self._phase_images = 0
        self._completed_epochs = 0
        self.method: TrainingMethod = self._preflight()

    # ----------------------------------------------------------------- checks before any training
    def _preflight(self) -> TrainingMethod:
        """Every configuration error is raised here, before data is loaded or a model trained."""
        from anytime.models import is_model
        from anytime.models.registry import unknown_model_error
        from anytime.training.methods import create_method

        cfg = self.config
        method = create_method(cfg.method, cfg.method_options)
        if not is_model(cfg.arch):
            raise unknown_model_error(cfg.arch)
        from anytime.data import parse_spec

        parse_spec(cfg.data)
        if cfg.batch_size % self.world_size:
            raise ConfigError(
                f"batch_size={cfg.batch_size} cannot be split evenly over {self.world_size} processes; "
                f"give a multiple of {self.world_size} (the batch size is the global batch)"
            )
        if self.dist.is_main:
            if self.resuming:
                if not (self.run_dir / CHECKPOINT).is_file():
                    raise TrainingError(
                        f"cannot resume {self.run_dir}: no checkpoint at {self.run_dir / CHECKPOINT} (the run "
                        "stopped before its first epoch ended); start it again without --resume"
                    )
            elif (self.run_dir / CONFIG_FILE).exists():
                raise ConfigError(
                    f"'{self.run_dir}' already holds a run ({CONFIG_FILE} exists); continue it with "
                    f"`anytime train --resume {self.run_dir}` or choose another --out"
                )
            check_writable(self.run_dir)
        return method

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
        self._started_group = ddp.init_distributed(self.dist, self.device)
        self._seed_everything(cfg.seed)

        self.dataset = open_dataset(cfg.data)
        if not self.resuming and cfg.data != self.dataset.spec:
            # Record the absolute spec: export and --resume may run from another working directory.
            self.config = cfg = cfg.replace(data=self.dataset.spec)
        info = self.dataset.info
        if cfg.num_classes is not None and cfg.num_classes != info.num_classes:
            raise DatasetError(
                f"--num-classes {cfg.num_classes} does not match the data set {self.dataset.spec}, which has "
                f"{info.num_classes} classes ({', '.join(info.classes[:5])}{', ...' if info.num_classes > 5 else ''}); "
                "drop --num-classes or use matching data"
            )
        split_path = self.run_dir / SPLIT_FILE
        if self.resuming:
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
        self.model = create(cfg.arch, **{**sizing, **dict(cfg.model_options)}).to(self.device)
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

        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
        )  # fmt: skip
        self.exit_loss = ExitLoss(cfg.kd_weight, cfg.kd_temperature)
        self.exit_weighting = self.model.default_exit_weights if cfg.exit_weights == "auto" else cfg.exit_weights
        example, _ = next(iter(self._loader(self.dataset.train, self.train_indices[:2], train=False, batch_size=2)))
        self.routes: Routes = compute_routes(self.model, example.to(self.device))
        self.method.setup(self)

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _loader(self, split, indices, *, train: bool, batch_size: int, seed: int = 0, epoch: int = 0, shard: bool = True, part=None):
        from anytime.data import make_loader

        return make_loader(
            split, indices, batch_size=batch_size, train=train, mean=self.mean, std=self.std,
            image_size=self.image_size, channels=self.channels, seed=seed, epoch=epoch,
            rank=self.rank if shard else 0, world_size=self.world_size if shard else 1,
            drop_last=train, num_workers=self.config.workers, pad=self.pad, flip=self.flip, part=part,
        )  # fmt: skip

    # ----------------------------------------------------------------- TrainingContext
    def train_batches(
        self, epoch: int, phase: str, part: tuple[int, int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        per_rank = self.config.batch_size // self.world_size
        loader = self._loader(
            self.dataset.train, self.train_indices, train=True, batch_size=per_rank,
            seed=phase_seed(self.config.seed, phase), epoch=epoch, part=part,
        )  # fmt: skip
        self._phase = phase if part is None else f"{phase} {part[0] + 1}/{part[1]}"
        self._running_loss = None
        self._phase_start = time.perf_counter()
        self._phase_images = 0
        self._open_bar(epoch, self._phase, len(loader))
        non_blocking = self.device.type == "cuda"
        try:
            for x, y in loader:
                yield x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)
        finally:
            self._close_bar()

    def exit_losses(self, outputs: list[torch.Tensor], targets: torch.Tensor, epoch: int) -> list[torch.Tensor]:
        weights = exit_weights(self.exit_weighting, self.num_exits, epoch, self.epochs)
        return [w * loss if w != 1.0 else loss for w, loss in zip(weights, self.exit_loss(outputs, targets))]

    def lr(self, epoch: int) -> float:
        cfg = self.config
        if cfg.schedule == "constant":
            return cfg.lr
        if cfg.schedule == "cosine":
            return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs))
        # multistep: divided at the first epoch >= fraction * epochs (epochs 150/225 of 300 in MSDNet).
        drops = sum(1 for m in cfg.milestones if epoch >= math.ceil(m * cfg.epochs))
        return cfg.lr * cfg.lr_gamma**drops

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
            f"non-finite loss ({value}) at epoch {epoch + 1}, step {step}, {where} (phase '{self._phase}'); "
            f"training stopped and {kept}. Lower --lr (now {self.lr(epoch):g}) or check the data"
        )

    def log_step(self, loss: float, batch_size: int) -> None:
        images = batch_size * self.world_size
        self._epoch_images += images
        self._phase_images += images
        self._running_loss = loss if self._running_loss is None else 0.9 * self._running_loss + 0.1 * loss
        if self._bar is not None:
            elapsed = max(time.perf_counter() - self._phase_start, 1e-9)
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{self._running_loss:.4f}", img_s=f"{self._phase_images / elapsed:.0f}", refresh=False)

    def _open_bar(self, epoch: int, phase: str, total: int) -> None:
        self._close_bar()
        if not (self.show_progress and self.dist.is_main and sys.stderr.isatty()):
            return
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{self.epochs} {phase}", leave=False, dynamic_ncols=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, split, indices) -> list[float]:
        """Per-exit top-1 accuracy; ranks evaluate disjoint shards and sum their counts."""
        was_training = model.training
        model.eval()
        correct = torch.zeros(self.num_exits, dtype=torch.float64)
        seen = 0
        for x, y in self._loader(split, indices, train=False, batch_size=self.config.eval_batch_size):
            x, y = x.to(self.device), y.to(self.device)
            for t, logits in enumerate(model(x)):
                correct[t] += (logits.argmax(1) == y).sum().item()
            seen += int(y.shape[0])
        model.train(was_training)
        totals = ddp.all_reduce_sum(torch.cat([correct, torch.tensor([float(seen)], dtype=torch.float64)]))
        n = totals[-1].item()
        if not n:
            return []  # no validation hold-out (--val-size 0)
        return [float(c / n) for c in totals[:-1].tolist()]

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
            if self.resuming:
                history = self._load_checkpoint()
            elif self.dist.is_main:
                self._write_config()
                atomic_write_json(self.run_dir / SPLIT_FILE, self.split_record)
            resumed_from = self._completed_epochs
            for epoch in range(self._completed_epochs, cfg.epochs):
                history.append(self._run_epoch(epoch, history))
            return self._finish(history, resumed_from)
        finally:
            self._close_bar()
            if cfg.deterministic:
                torch.use_deterministic_algorithms(previous_determinism)
            ddp.shutdown_distributed(self._started_group)

    def _run_epoch(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        lr = self.lr(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._epoch_images = 0
        start = time.perf_counter()
        metrics = self.method.train_epoch(self, epoch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_time = time.perf_counter() - start
        val = self.evaluate(self.model, *self.val_split)
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            **{k: float(v) for k, v in metrics.items()},
            "val_acc": val,
            "val_acc_mean": float(np.mean(val)) if val else None,
            "train_time_s": round(train_time, 4),
            "epoch_time_s": round(time.perf_counter() - start, 4),
            "images_per_s": round(self._epoch_images / max(train_time, 1e-9), 2),
        }
        if self.epoch_hook is not None:
            self.epoch_hook(self, epoch, row)
        self._completed_epochs = epoch + 1
        # Ctrl-C while the checkpoint is written must not leave the run without this epoch.
        with _defer_keyboard_interrupt():
            if self.dist.is_main:
                self._save_checkpoint(history + [row])
                self._write_results(history + [row])
        ddp.barrier()
        (logger.info if self.dist.is_main else logger.debug)(
            "epoch %d/%d loss %.4f val %s (mean %s) %.1fs %.0f img/s", epoch + 1, self.epochs, row.get("loss", float("nan")),
            " ".join(f"{a:.3f}" for a in val) or "-", "-" if not val else f"{row['val_acc_mean']:.4f}", train_time,
            row["images_per_s"],
        )  # fmt: skip
        return row

    def _finish(self, history: list[dict[str, Any]], resumed_from: int) -> RunResult:
        from anytime.models import Preprocessing, save_model

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
            preprocessing = Preprocessing(mean=list(self.mean), std=list(self.std), resize=None)
            save_model(plain, self.run_dir, preprocessing, list(info.classes), provenance)
            summary = {
                "method": self.config.method,
                "arch": self.config.arch,
                "epochs": self.config.epochs,
                "val_accuracy": val,
                "val_accuracy_mean": float(np.mean(val)) if val else None,
                "test_accuracy": test,
                "test_accuracy_mean": None if test is None else float(np.mean(test)),
                "train_time_s": float(sum(r["train_time_s"] for r in history)),
                "epoch_time_s": float(np.mean([r["train_time_s"] for r in history])) if history else None,
                "world_size": self.world_size,
            }
            atomic_write_json(self.run_dir / SUMMARY_FILE, summary)
        ddp.barrier()
        return RunResult(self.run_dir, self.config, val, test, history, resumed_from)

    # ----------------------------------------------------------------- files
    def _write_config(self) -> None:
        resolved = self.config.to_dict()
        resolved["method_options"] = options_to_dict(self.method.options)
        atomic_write_json(self.run_dir / CONFIG_FILE, resolved)

    def _write_results(self, history: list[dict[str, Any]]) -> None:
        atomic_write_text(self.run_dir / RESULTS_JSONL, "".join(json.dumps(r) + "\n" for r in history))
        rows = [_flatten(r) for r in history]
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.run_dir / RESULTS_CSV, out.getvalue())

    def _save_checkpoint(self, history: list[dict[str, Any]]) -> None:
        save_checkpoint(
            self.run_dir / CHECKPOINT,
            {
                "epoch": self._completed_epochs,
                "config": self.config.to_dict(),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                # The lr schedule is a pure function of the epoch (see `lr`); its inputs are stored.
                "schedule": {"kind": self.config.schedule, "next_lr": self.lr(min(self._completed_epochs, self.epochs - 1))},
                "rng": rng_state(),
                "method": {"name": self.method.name, "state": self.method.state_dict(), "analysis": self.method.analysis()},
                "history": history,
            },
        )

    def _load_checkpoint(self) -> list[dict[str, Any]]:
        state = load_checkpoint(self.run_dir / CHECKPOINT, map_location=self.device)
        saved = state.get("config", {})
        for key in ("arch", "method", "data", "seed"):
            if saved.get(key) != getattr(self.config, key):
                raise TrainingError(
                    f"checkpoint {self.run_dir / CHECKPOINT} was written with {key}={saved.get(key)!r} but "
                    f"{CONFIG_FILE} says {getattr(self.config, key)!r}; the run directory was modified"
                )
        if state["method"]["name"] != self.method.name:
            raise TrainingError(f"checkpoint holds method '{state['method']['name']}', not '{self.method.name}'")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.method.load_state_dict(state["method"]["state"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise TrainingError(f"checkpoint {self.run_dir / CHECKPOINT} does not fit this run: {exc}") from exc
        set_rng_state(state["rng"])
        self._completed_epochs = int(state["epoch"])
        logger.info("resumed %s after epoch %d", self.run_dir, self._completed_epochs)
        return list(state["history"])


def _flatten(row: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                flat[f"{k}_{i}"] = item
        else:
            flat[k] = v
    return flat


@contextlib.contextmanager
def _defer_keyboard_interrupt():
    """Hold Ctrl-C until the block ends (main thread only), then raise it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


__all__ = ["RunResult", "Trainer", "TrainConfig", "resume", "train"]
