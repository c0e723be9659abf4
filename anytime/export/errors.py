"""Typed export failures (optimum style), so callers can tell what kind of check failed.

All derive from `anytime.errors.ExportError`: when one is raised, nothing was written to the output.
Torch-free.
"""

from __future__ import annotations

from anytime.errors import ExportError


class OnnxCheckError(ExportError):
    """onnx's checker rejected an exported graph."""


class OutputNamesError(ExportError):
    """A graph's input or output names differ from the stage contract."""


class ShapeError(ExportError):
    """A graph's output shapes differ from PyTorch's (often a batch size baked into the graph)."""


class AtolError(ExportError):
    """An exit's logits from ONNX Runtime differ from PyTorch's by more than the tolerance."""


class ArgmaxError(ExportError):
    """ONNX Runtime and PyTorch predict different classes on images where PyTorch's top two are not tied."""


class WeightSizeError(ExportError):
    """The stage graphs hold far more weight bytes than the model has parameters (duplication or bloat)."""


class OutputExistsError(ExportError):
    """The output directory already exists and replacing it was not asked for."""


__all__ = [
    "ArgmaxError",
    "AtolError",
    "ExportError",
    "OnnxCheckError",
    "OutputExistsError",
    "OutputNamesError",
    "ShapeError",
    "WeightSizeError",
]
