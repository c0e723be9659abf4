"""Multi-exit architectures (MSDNet, SDN), the model registry and cost accounting."""

from anytime.errors import require_torch

require_torch("Building models (anytime.models)")  # before any torch import: one clear line instead of a traceback


from anytime.models.base import ModelSpec, MultiExitNetwork, Stage, State
from anytime.models.costs import cost_table, exit_costs, exit_params
from anytime.models.io import load_model, read_model_meta, save_model
from anytime.models.registry import create, is_model, list_models, register_model

__all__ = [
    "ModelSpec",
    "MultiExitNetwork",
    "Stage",
    "State",
    "cost_table",
    "create",
    "exit_costs",
    "exit_params",
    "is_model",
    "list_models",
    "load_model",
    "read_model_meta",
    "register_model",
    "save_model",
]
