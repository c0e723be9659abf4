"""One small error hierarchy so callers can catch everything this package raises on purpose.

Every message names the problem, the offending value and the fix.
"""

from __future__ import annotations


class AnytimeError(Exception):
    """Base class of all errors raised deliberately by anytime."""


class ConfigError(AnytimeError, ValueError):
    """An argument, option or preset is invalid (unknown name, out-of-range value)."""


class DatasetError(AnytimeError, ValueError):
    """A dataset spec, path or file is missing, malformed or inconsistent."""


class TrainingError(AnytimeError, RuntimeError):
    """Training cannot go on (non-finite loss, incompatible resume, ...)."""


class ExportError(AnytimeError, RuntimeError):
    """Export failed a check; nothing was written."""


class BundleError(AnytimeError, ValueError):
    """A bundle is missing, damaged or of an unknown format version."""


class BudgetError(AnytimeError, ValueError):
    """A budget is malformed or outside the feasible range of the model."""


class ProfileError(AnytimeError, ValueError):
    """A latency profile is malformed, of an unknown version, or was measured for another bundle or provider."""


class AnytimeWarning(UserWarning):
    """Base class of the warnings anytime gives on purpose (the CLI prints them as one `Warning:` line)."""


class ProfileMismatchWarning(AnytimeWarning):
    """A latency profile was measured under other conditions (threads, machine) than the model now runs in."""


class OutputError(AnytimeError, OSError):
    """An output file cannot be created where it was asked for (a file in the way, no permission, ...)."""


class InputImageError(AnytimeError, ValueError):
    """An input image cannot be read or has an unexpected mode or size."""


class ClusterError(AnytimeError, RuntimeError):
    """A job on a Ray cluster failed (a worker's error, or the cluster itself); nothing was written."""


class MissingDependencyError(AnytimeError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or fail with the pip command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{module}', which is not installed. "
            f"Install it with: pip install 'anytime[{extra}]'"
        ) from exc


TORCH_HINT = (
    "Install it with: pip install 'anytime[train]' (install the torch build you want first, e.g. the CPU-only "
    "one, so that pip keeps it)"
)


def require_torch(purpose: str) -> None:
    """Fail with the install command when torch is missing: serving installs carry no torch on purpose."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise MissingDependencyError(f"{purpose} needs PyTorch, which this installation does not have. {TORCH_HINT}")
