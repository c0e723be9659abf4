"""Export a trained run as an ONNX bundle (one graph per exit stage) and check bundles.

    from anytime.export import export_bundle, check_bundle
    result = export_bundle("runs/fm", "bundles/fm")      # validated against PyTorch, written atomically
    problems = check_bundle("bundles/fm")               # [] when hashes, schema and graphs are sound

Importing this package does not import torch: `export_bundle` and the torch-side modules load on first
use; the bundle format itself (schema and integrity checks) is `anytime.formats.bundle`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anytime._lazy import lazy_getattr
from anytime.export.errors import (
    ArgmaxError,
    AtolError,
    OnnxCheckError,
    OutputExistsError,
    OutputNamesError,
    ShapeError,
    WeightSizeError,
)
from anytime.formats.bundle import FORMAT, FORMAT_VERSION, check_bundle, read_manifest

if TYPE_CHECKING:  # pragma: no cover
    from anytime.export.bundle import ExportResult, export_bundle

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ArgmaxError",
    "AtolError",
    "ExportResult",
    "OnnxCheckError",
    "OutputExistsError",
    "OutputNamesError",
    "ShapeError",
    "WeightSizeError",
    "check_bundle",
    "export_bundle",
    "read_manifest",
]

_LAZY = {"export_bundle": "anytime.export.bundle", "ExportResult": "anytime.export.bundle"}


__getattr__ = lazy_getattr(__name__, _LAZY)
