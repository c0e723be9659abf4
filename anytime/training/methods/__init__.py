"""Registry of training methods: name -> the module that defines it (imported only when used).

Adding a method = one module with a `TrainingMethod` subclass whose `name` is set, plus one line here.
A module may also register extra classes at import time with `@register_method`.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Mapping

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

_REGISTERED: dict[str, type[TrainingMethod]] = {}


def register_method(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    """Class decorator: make `cls` findable by its `name` (its module must be in METHOD_MODULES)."""
    name = cls.name
    if name in _REGISTERED and _REGISTERED[name] is not cls:
        raise ConfigError(f"training method '{name}' is registered twice; rename one of them")
    _REGISTERED[name] = cls
    return cls


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
    if name not in _REGISTERED:
        module_name = METHOD_MODULES[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                raise ConfigError(
                    f"training method '{name}' is listed but its module {module_name} is not part of this "
                    "installation; reinstall anytime or choose another method"
                ) from exc
            raise
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, TrainingMethod)
                and getattr(value, "name", None) == name
            ):
                _REGISTERED.setdefault(name, value)
        if name not in _REGISTERED:
            raise ConfigError(f"module {module_name} defines no TrainingMethod with name '{name}'")
    return _REGISTERED[name]


def create_method(name: str, options: Mapping[str, Any] | None = None) -> TrainingMethod:
    """Instantiate a method with options given as typed values or CLI strings (validated)."""
    from anytime.training.config import build_options

    cls = get_method_class(name)
    opts = build_options(cls.Options, dict(options or {}), owner=f"method '{name}'")
    return cls(opts)


__all__ = ["METHOD_MODULES", "create_method", "get_method_class", "list_methods", "register_method"]
