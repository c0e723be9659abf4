"""anytime: anytime and budgeted inference with multi-exit image classifiers.

Importing the package is cheap and never imports torch: the training stack
(`anytime.models`, `anytime.training`, `anytime.export`) is imported on use,
and the inference runtime (`anytime.load`) needs only onnxruntime, numpy and pillow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from anytime.errors import AnytimeError

__version__ = "0.1.0"

__all__ = ["AnytimeError", "__version__", "load", "sample_images"]

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from anytime.runtime import AnytimeModel


def load(bundle: Any = None, providers: Any = None, **kwargs: Any) -> "AnytimeModel":
    """Load an exported bundle for budgeted early-exit inference (the embedded default when None)."""
    from anytime.runtime import load as _load

    return _load(bundle, providers=providers, **kwargs)


def sample_images() -> "Path":
    """Folder of the sample images shipped with the embedded default model (class-named sub-folders)."""
    from anytime.formats.bundle import SAMPLE_IMAGES_DIR

    return SAMPLE_IMAGES_DIR
