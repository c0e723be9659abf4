"""Registry of training methods: name -> the module that defines it (imported only when used).

Adding a method = one module with a `TrainingMethod` subclass whose `name` is set, plus one line here.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from typing import Any

from anytime.errors import ConfigError
from anytime.training.base import TrainingMethod

# name -> module defining the TrainingMethod subclass with that `name`
METHOD_MODULES: dict[str, str] = {
    "joint": "anytime.training.methods.joint",
    "ge": "anytime.training.methods.ge",
    "drmgf": "anytime.training.methods.drmgf.method",
    "meta-gf": "anytime.training.methods.drmgf.method",  # DR-MGF ablation: no dynamic routes
    "dr-avgf": "anytime.training.methods.drmgf.method",  # DR-MGF ablation: mean fusion
    "pcgrad": "anytime.training.methods.jd",
    "cagrad": "anytime.training.methods.jd",
    "upgrad": "anytime.training.methods.jd",
    "mgda": "anytime.training.methods.jd",
    "imtlg": "anytime.training.methods.jd",
    "alignedmtl": "anytime.training.methods.jd",
    "nashmtl": "anytime.training.methods.jd",
}


def list_methods() -> list[str]:
    return sorted(METHOD_MODULES)


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(METHOD_MODULES), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown training method '{name}'.{hint} Available: {', '.join(list_methods())}.")


def get_method_class(name: str) -> type[TrainingMethod]:
    """The class registered under `name`; imports its module on first use."""
    if name not in METHOD_MODULES:
        raise _unknown(name)
    module = importlib.import_module(METHOD_MODULES[name])
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, TrainingMethod) and getattr(value, "name", None) == name:
            return value
    raise ConfigError(f"module {METHOD_MODULES[name]} defines no TrainingMethod with name '{name}'")


def create_method(name: str, options: Mapping[str, Any] | None = None) -> TrainingMethod:
    """Instantiate a method with options given as typed values or CLI strings (validated)."""
    from anytime.training.config import build_options

    cls = get_method_class(name)
    opts = build_options(cls.Options, dict(options or {}), owner=f"method '{name}'")
    return cls(opts)


__all__ = ["METHOD_MODULES", "create_method", "get_method_class", "list_methods"]
