"""Running a bundle's stage graphs one after another with ONNX Runtime (numpy only, no torch).

Used by the export to validate the graphs against PyTorch and to compute the calibration logits with
exactly the graphs a runtime will load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from anytime.errors import require

PROVIDERS = ["CPUExecutionProvider"]


def make_session(path: str | Path, providers: Sequence[str] = tuple(PROVIDERS)):
    ort = require("onnxruntime", "cpu", "Running ONNX graphs")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers etc. on stderr
    session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    # A requested provider that fails to load is silently replaced by CPU; say so instead.
    missing = [p for p in providers if p not in session.get_providers()]
    if missing:
        raise RuntimeError(f"ONNX Runtime could not enable providers {missing} for {path}")
    return session


@dataclass
class StageIO:
    inputs: list[str]
    outputs: list[str]
    logits: str


class OrtChain:
    """The stage sessions in order; `run(images)` returns every exit's logits."""

    def __init__(self, paths: Sequence[str | Path], io: Sequence[StageIO]) -> None:
        self.sessions = [make_session(p) for p in paths]
        self.io = list(io)

    def run_all(self, images: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Every stage's outputs by name, feeding each stage the state of the previous one."""
        values: dict[str, np.ndarray] = {self.io[0].inputs[0]: images}
        per_stage = []
        for session, io in zip(self.sessions, self.io):
            outs = session.run(io.outputs, {name: values[name] for name in io.inputs})
            named = dict(zip(io.outputs, outs))
            per_stage.append(named)
            values = named
        return per_stage

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        return [named[io.logits] for named, io in zip(self.run_all(images), self.io)]
