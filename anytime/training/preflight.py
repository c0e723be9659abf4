"""Checks that run before any data is loaded or any model trained: every configuration error of a run
(unknown names, impossible batch split, occupied or unwritable output, nothing to resume, changed
settings on resume) is raised here, so a bad command fails in a second with one clear line."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from anytime.errors import ConfigError
from anytime.fileio import check_writable
from anytime.formats.rundir import CHECKPOINT, CONFIG_FILE, MODEL_META
from anytime.training.base import TrainingMethod
from anytime.training.config import TrainConfig
from anytime.training.distributed import DistInfo

# None of these changes the arithmetic beyond float rounding (torch.compile fuses the same operations).
RESUMABLE_CHANGES = frozenset({"device", "workers", "compile"})


def preflight(config: TrainConfig, dist: DistInfo, *, resuming: bool) -> TrainingMethod:
    """Validate `config` for a run on `dist`; return the (constructed, not yet set up) method."""
    from anytime.data import parse_spec
    from anytime.models import is_model
    from anytime.models.registry import unknown_model_error
    from anytime.training.methods import create_method

    method = create_method(config.method, config.method_options)
    if not is_model(config.arch):
        raise unknown_model_error(config.arch)
    parse_spec(config.data)
    if config.compile != "off" and not method.compilable:
        raise ConfigError(
            f"--compile {config.compile} cannot train method '{config.method}': it differentiates each exit's loss "
            "through one forward pass, and torch.compile's graphs give wrong gradients from the second backward "
            "on; drop --compile (joint, ge and the DR-MGF family compile)"
        )
    if config.batch_size % dist.world_size:
        raise ConfigError(
            f"batch_size={config.batch_size} cannot be split evenly over {dist.world_size} processes; "
            f"give a multiple of {dist.world_size} (the batch size is the global batch)"
        )
    if dist.is_main:
        check_run_dir(Path(config.out), resuming=resuming)
    return method


def check_run_dir(run_dir: Path, *, resuming: bool) -> None:
    """A new run needs a writable directory that holds no run. A resumed run continues from its checkpoint,
    or, when it stopped before its first epoch ended, starts again from the beginning with its own config."""
    if not resuming and (run_dir / CONFIG_FILE).exists():
        if not (run_dir / CHECKPOINT).is_file() and not (run_dir / MODEL_META).is_file():
            raise ConfigError(
                f"'{run_dir}' already holds a run that stopped before its first epoch ended; "
                f"`anytime train --resume {run_dir}` starts it again from the beginning with its own settings, "
                "or choose another --out"
            )
        raise ConfigError(
            f"'{run_dir}' already holds a run ({CONFIG_FILE} exists); continue it with "
            f"`anytime train --resume {run_dir}` or choose another --out"
        )
    # A file that would be written there, so the one-line error names the run directory's own problem.
    check_writable(run_dir / CONFIG_FILE)


def resume_config(run_dir: Path, overrides: Mapping[str, Any]) -> TrainConfig:
    """The configuration of the run in `run_dir`, with the few settings a resume may change applied."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"cannot resume: {path} not found; '{run_dir}' is not a run directory written by anytime train"
        )
    bad = sorted(k for k, v in overrides.items() if v is not None and k not in RESUMABLE_CHANGES)
    if bad:
        raise ConfigError(
            f"cannot change {bad} when resuming: a resumed run repeats its configuration exactly "
            f"(only {sorted(RESUMABLE_CHANGES)} may change); start a new run with another --out instead"
        )
    config = TrainConfig.from_dict(json.loads(path.read_text()))
    changes = {k: v for k, v in overrides.items() if v is not None}
    return config.replace(out=str(run_dir), **changes)


def check_precision(amp: str, device: torch.device) -> None:
    """bf16 autocast on a GPU needs hardware support (Ampere or newer); fp16 runs everywhere."""
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"--amp bf16 needs a GPU with bfloat16 support (Ampere or newer), and {torch.cuda.get_device_name(device)} "
            "has none; use --amp fp16"
        )


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was requested but CUDA is not available here; use --device cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)
