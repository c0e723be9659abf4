"""Budgeted early-exit inference on ONNX Runtime (numpy, pillow and onnxruntime only; never torch).

model = anytime.load("bundles/fm")          # or anytime.load() for the embedded default
print(model)                                # exits with cost and validation accuracy
policy = model.calibrate("50%")             # thresholds fitted on the bundle's validation logits
preds = model.predict("images/", budget="50%")
preds.save("preds.jsonl")
"""

from anytime.formats.bundle import Bundle, read_bundle
from anytime.runtime.budget import Budget, format_cost, parse_budget
from anytime.runtime.calibration import ExitPolicy
from anytime.runtime.model import AnytimeModel, load
from anytime.runtime.results import Prediction, Predictions

__all__ = [
    "AnytimeModel",
    "Budget",
    "Bundle",
    "ExitPolicy",
    "Prediction",
    "Predictions",
    "format_cost",
    "load",
    "parse_budget",
    "read_bundle",
]
