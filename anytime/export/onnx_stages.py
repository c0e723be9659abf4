"""Export a multi-exit network as one ONNX graph per stage (and optionally one per full exit).

Stage k's graph takes the state tensors of stage k-1 (the image for stage 0) as named inputs and
returns its own state tensors `s{k}_{i}` and the logits `logits_{k}`; batch is the only dynamic axis.
Each stage module holds only its own block and head, so every weight lands in exactly one stage file.

Exporter choice: the TorchScript exporter (`dynamo=False`) by default. Measured with torch 2.13 on
CPU (whole export including validation and calibration, warm process): msdnet-tiny 3.1 s with it
against 26 s with the dynamo exporter (test-convnet: 0.3 s against 8.7 s for the bare graph export),
with the same weight bytes and the same differences from PyTorch. The dynamo exporter also needs
onnxscript (only a test dependency here), prints progress on stdout and cannot target opset 17 without
a failing version conversion it then falls back from. The TorchScript exporter folds eval-mode
BatchNorm into the preceding convolution and keeps weights as plain initializers. It is deprecated
upstream, so `exporter="dynamo"` stays available, and every graph is validated against PyTorch
either way.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from anytime.errors import ExportError
from anytime.formats.bundle import BATCH_AXIS, IMAGE_INPUT, logits_name, state_name
from anytime.models.base import MultiExitNetwork, State

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")


def max_opset(exporter: str) -> int:
    """The newest opset `exporter` can write (torch keeps the numbers in a private module; 20/23 if it moves)."""
    constants = getattr(torch.onnx, "_constants", None)
    if exporter == "torchscript":
        return int(getattr(constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    return int(getattr(constants, "ONNX_MAX_OPSET", 23))


class FlatStage(nn.Module):
    """A stage with its state tuple flattened into positional tensors: (*state) -> (*next_state, logits)."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        next_state, logits = self.stage(tuple(state))
        return (*next_state, logits)


class FullExit(nn.Module):
    """Stages 0..k chained: image -> logits of exit k."""

    def __init__(self, model: MultiExitNetwork, exit_index: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(model.stages[: exit_index + 1])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        state: State = (image,)
        logits = image
        for stage in self.stages:
            state, logits = stage(state)
        return logits


@dataclass
class StageIO:
    """A stage graph's input names, output names and which output is the exit's logits."""

    inputs: list[str]
    outputs: list[str]
    logits: str

    def as_tuple(self) -> tuple[list[str], list[str], str]:
        return self.inputs, self.outputs, self.logits


@dataclass
class StagePlan:
    """Names and example inputs of one stage graph."""

    io: StageIO
    example: tuple[torch.Tensor, ...]


def plan_stages(model: MultiExitNetwork, example_image: torch.Tensor) -> list[StagePlan]:
    """Run the model once to learn each stage's state arity and record names and example inputs."""
    plans: list[StagePlan] = []
    state: State = (example_image,)
    inputs = [IMAGE_INPUT]
    with torch.no_grad():
        for k, stage in enumerate(model.stages):
            next_state, _ = stage(state)
            outputs = [state_name(k, i) for i in range(len(next_state))] + [logits_name(k)]
            plans.append(StagePlan(StageIO(inputs, outputs, logits_name(k)), tuple(state)))
            inputs = outputs[:-1]
            state = next_state
    return plans


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    exporter: str,
) -> bytes:
    module.eval()
    if exporter == "torchscript":
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated upstream (see the module docstring for why we use it).
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            torch.onnx.export(
                module,
                args,
                buffer,  # type: ignore[arg-type]  # torch's stub says path only; a BytesIO works (file-like f)
                input_names=input_names,
                output_names=output_names,
                dynamic_axes={name: {0: BATCH_AXIS} for name in input_names + output_names},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        return buffer.getvalue()
    if exporter == "dynamo":
        batch = torch.export.Dim(BATCH_AXIS)
        # *state is one var-positional argument: its dynamic shapes are one tuple, one dict per tensor.
        shapes = (tuple({0: batch} for _ in args),) if isinstance(module, FlatStage) else ({0: batch},)
        program = torch.onnx.export(
            module,
            args,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=shapes,
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        if program is None:  # torch returns an ONNXProgram whenever dynamo=True
            raise ExportError("torch.onnx.export(dynamo=True) returned no ONNX program")
        return program.model_proto.SerializeToString()
    raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")


def _export_or_explain(
    what: str,
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    exporter: str,
) -> bytes:
    try:
        with torch.no_grad():
            return _export(module, args, input_names, output_names, opset, exporter)
    except ValueError:
        raise
    except Exception as exc:  # torch.onnx raises many types (unsupported op, opset, tracing failures)
        other = "dynamo" if exporter == "torchscript" else "torchscript"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(
            f"torch.onnx could not export {what} with the {exporter} exporter at opset {opset}: "
            f"{type(exc).__name__}: {first_line}. Try another --opset (default {DEFAULT_OPSET}) or --exporter {other}"
        ) from exc


def export_stage(stage: nn.Module, plan: StagePlan, opset: int = DEFAULT_OPSET, exporter: str = "torchscript") -> bytes:
    """Serialised ONNX graph of one stage."""
    return _export_or_explain(
        f"stage {plan.io.logits.split('_')[-1]}",
        FlatStage(stage),
        plan.example,
        plan.io.inputs,
        plan.io.outputs,
        opset,
        exporter,
    )


def export_full_exit(
    model: MultiExitNetwork,
    exit_index: int,
    example_image: torch.Tensor,
    opset: int = DEFAULT_OPSET,
    exporter: str = "torchscript",
) -> bytes:
    """Serialised ONNX graph image -> logits of exit `exit_index` (holds the weights of stages 0..k)."""
    return _export_or_explain(
        f"full exit {exit_index}",
        FullExit(model, exit_index),
        (example_image,),
        [IMAGE_INPUT],
        [logits_name(exit_index)],
        opset,
        exporter,
    )


def initializer_bytes(onnx_bytes: bytes) -> int:
    """Bytes of weights (initializers and large constants) stored in a serialised graph."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    total = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    total += numpy_helper.to_array(attr.t).nbytes
    return total
