"""A timm-style model registry: tiny builders per preset, `create(name, **overrides)`."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from anytime.errors import AnytimeError, ConfigError

_BUILDERS: dict[str, Callable[..., Any]] = {}

F = TypeVar("F", bound=Callable[..., Any])


def register_model(fn: F) -> F:
    """Register a preset builder under its function name with '_' replaced by '-'."""
    name = fn.__name__.replace("_", "-")
    if name in _BUILDERS:
        raise ConfigError(f"model '{name}' is registered twice; rename one of the builders")
    _BUILDERS[name] = fn
    return fn


def _ensure_builtin() -> None:
    # Importing the architecture modules runs their @register_model decorators.
    from anytime.models import msdnet, sdn, testnets  # noqa: F401


def list_models(pattern: str = "*") -> list[str]:
    """Registered preset names matching a shell-style wildcard (e.g. "msdnet*")."""
    _ensure_builtin()
    return sorted(n for n in _BUILDERS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    _ensure_builtin()
    return name in _BUILDERS


def model_description(name: str) -> str:
    """First line of a preset builder's docstring ("" when it has none)."""
    _ensure_builtin()
    if name not in _BUILDERS:
        raise unknown_model_error(name)
    lines = (_BUILDERS[name].__doc__ or "").strip().splitlines()
    return lines[0] if lines else ""


def unknown_model_error(name: str) -> ConfigError:
    _ensure_builtin()
    close = difflib.get_close_matches(name, list(_BUILDERS), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(
        f"unknown model '{name}'.{hint} See `anytime info --list` (or anytime.models.list_models()) "
        "for the available presets."
    )


def create(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    **overrides: Any,
):
    """Build a registered multi-exit network.

    Arguments left as None keep the preset's value, so CLI defaults never clobber a preset.
    """
    _ensure_builtin()
    if name not in _BUILDERS:
        raise unknown_model_error(name)
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if in_channels is not None:
        kwargs["in_channels"] = int(in_channels)
    if image_size is not None:
        kwargs["image_size"] = image_size
    try:
        model = _BUILDERS[name](**kwargs)
    except AnytimeError:
        raise  # the builders' own checks name the option already
    except (TypeError, ValueError, IndexError) as exc:
        # A wrong name, or a value of the wrong type or range that the builder's own checks did not catch.
        given = ", ".join(f"{k}={v!r}" for k, v in overrides.items() if v is not None)
        raise ConfigError(
            f"invalid option for model '{name}'{f' ({given})' if given else ''}: {exc}; check the option names and "
            "values (--model-option key=value takes JSON: numbers, true/false, lists like [1,2,4])"
        ) from exc
    model.spec.arch = name
    model.spec.overrides = {k: v for k, v in kwargs.items() if k not in ("num_classes", "in_channels", "image_size")}
    return model
