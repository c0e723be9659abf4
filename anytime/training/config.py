"""The fully resolved configuration of a training run, and typed parsing of method options.

`TrainConfig` maps one-to-one onto the `anytime train` options (`--batch-size` <-> `batch_size`); the
run directory's `config.json` is `TrainConfig.to_dict()` with the method options resolved to their
complete, typed values.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from anytime.errors import ConfigError
from anytime.training.compilation import COMPILE_MODES
from anytime.training.losses import EXIT_WEIGHTINGS
from anytime.training.precision import AMP_MODES

SCHEDULES = ("multistep", "cosine", "constant")
DEVICES_HELP = "'auto', 'cpu', 'cuda' or 'cuda:N'"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs. Defaults follow the MSDNet / DR-MGF papers (SGD, lr 0.1 /10 at 50%, 75%)."""

    arch: str
    data: str
    epochs: int
    out: str
    method: str = "joint"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    model_options: Mapping[str, Any] = field(default_factory=dict)
    num_classes: int | None = None  # only checked against the data set; the data decides
    batch_size: int = 64  # global batch: split evenly over ranks under torchrun
    eval_batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "multistep"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the epochs at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    seed: int = 0
    device: str = "auto"
    val_size: int | float | None = None  # images, or a fraction in (0, 1); None: anytime.data's default (5,000 or 10%)
    train_limit: int | None = None  # train on only the first N training images (quick trials)
    workers: int = 0
    augment: bool = True
    kd_weight: float = 0.0  # Phuong & Lampert 2019 distillation from the last exit; 0 disables
    kd_temperature: float = 4.0
    # per-exit loss weights for every method: "auto" takes the architecture's default ("sdn" for SDN
    # networks, "constant" otherwise)
    exit_weights: str = "auto"
    deterministic: bool = False  # torch.use_deterministic_algorithms(True)
    amp: str = "off"  # mixed precision of the training steps: "bf16", "fp16" (with loss scaling) or "off"
    channels_last: bool = False  # model and input batches in channels_last memory format
    compile: str = "off"  # torch.compile of the training steps: "default", "reduce-overhead", "max-autotune"

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, fix: str) -> ConfigError:
            return ConfigError(f"invalid {name}={value!r}: {fix}")

        # Python callers pass values without the CLI's typing: a wrong type is one clear line, not a TypeError
        # here or a float batch size deep in the loader.
        for name in ("epochs", "batch_size", "eval_batch_size", "seed", "workers", "train_limit", "num_classes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise bad(name, value, "give a whole number")
        for name in ("lr", "momentum", "weight_decay", "lr_gamma", "kd_weight", "kd_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, value, "give a finite number")
        if isinstance(self.val_size, bool) or not isinstance(self.val_size, (int, float, type(None))):
            raise bad("val_size", self.val_size, "give a number of validation images >= 0 or a fraction in (0, 1)")
        if isinstance(self.milestones, str) or not all(
            isinstance(m, (int, float)) and not isinstance(m, bool) for m in self.milestones
        ):
            raise bad(
                "milestones", self.milestones, "give increasing fractions of the epochs in (0, 1), e.g. (0.5, 0.75)"
            )
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        if self.epochs < 1:
            raise bad("epochs", self.epochs, "give a positive number of epochs")
        if self.batch_size < 1:
            raise bad("batch_size", self.batch_size, "give a positive batch size")
        if self.eval_batch_size < 1:
            raise bad("eval_batch_size", self.eval_batch_size, "give a positive batch size")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", self.lr, "the learning rate must be a positive number")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", self.momentum, "momentum must be in [0, 1)")
        if self.weight_decay < 0:
            raise bad("weight_decay", self.weight_decay, "weight decay must be >= 0")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", self.schedule, f"choose one of {', '.join(SCHEDULES)}")
        if any(not 0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise bad("milestones", self.milestones, "give increasing fractions of the epochs in (0, 1), e.g. 0.5,0.75")
        if not 0 < self.lr_gamma <= 1:
            raise bad("lr_gamma", self.lr_gamma, "the lr factor at each milestone must be in (0, 1]")
        if self.val_size is not None and (
            self.val_size < 0 or (not float(self.val_size).is_integer() and not 0 < self.val_size < 1)
        ):
            raise bad("val_size", self.val_size, "give a number of validation images >= 0 or a fraction in (0, 1)")
        if self.train_limit is not None and self.train_limit < 1:
            raise bad("train_limit", self.train_limit, "give a positive number of training images")
        if self.workers < 0:
            raise bad("workers", self.workers, "give a number of loader workers >= 0")
        if not 0 <= self.kd_weight <= 1:
            raise bad("kd_weight", self.kd_weight, "the distillation weight must be in [0, 1] (0 disables it)")
        if not self.kd_temperature > 0:
            raise bad("kd_temperature", self.kd_temperature, "the distillation temperature must be > 0")
        if self.exit_weights not in EXIT_WEIGHTINGS:
            raise bad("exit_weights", self.exit_weights, f"choose one of {', '.join(EXIT_WEIGHTINGS)}")
        if self.amp not in AMP_MODES:
            raise bad("amp", self.amp, f"choose one of {', '.join(AMP_MODES)}")
        if self.compile not in COMPILE_MODES:
            raise bad("compile", self.compile, f"choose one of {', '.join(COMPILE_MODES)}")
        if self.num_classes is not None and self.num_classes < 2:
            raise bad("num_classes", self.num_classes, "a classifier needs at least 2 classes")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise bad("device", self.device, f"use {DEVICES_HELP}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["method_options"] = _jsonable(dict(self.method_options))
        d["model_options"] = _jsonable(dict(self.model_options))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}; known keys: {sorted(known)}")
        values = dict(d)
        if "milestones" in values:
            values["milestones"] = tuple(float(m) for m in values["milestones"])
        return cls(**values)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def parse_key_values(pairs: list[str] | tuple[str, ...], what: str = "--method-option") -> dict[str, str]:
    """['c=0.4', 'weights=1,1,2'] -> {'c': '0.4', 'weights': '1,1,2'}."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"{what} expects KEY=VALUE, got {pair!r} (e.g. {what} c=0.4)")
        out[key] = value.strip()
    return out


def build_options(options_cls: type, values: Mapping[str, Any], owner: str) -> Any:
    """Instantiate a frozen options dataclass from typed values or CLI strings, with clear errors."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "(none)"
        raise ConfigError(f"unknown option(s) {unknown} for {owner}; its options are: {known}")
    hints = typing.get_type_hints(options_cls)
    kwargs = {name: _coerce(value, hints[name], f"{owner} option '{name}'") for name, value in values.items()}
    try:
        return options_cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid options for {owner}: {exc}") from exc


def options_to_dict(options: Any) -> dict[str, Any]:
    return _jsonable(dataclasses.asdict(options))


def _coerce(value: Any, hint: Any, what: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, what)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{what}: cannot read {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{what} must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        item_type = args[0] if args else str
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, item_type, what) for v in items if v != "")
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    if hint in (int, float, str):
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            coerced = hint(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{what} must be {hint.__name__}, got {value!r}") from None
        if hint is float and not math.isfinite(coerced):
            raise ConfigError(f"{what} must be a finite number, got {value!r}")
        return coerced
    return value
